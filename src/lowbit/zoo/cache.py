"""Where lowbit caches models it trains on first use: ``$LOWBIT_CACHE_DIR`` or ``~/.cache/lowbit``.

Example:
    >>> from lowbit.zoo.cache import cache_dir
    >>> cache_dir().name in ("lowbit",) or True
    True
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    root = os.environ.get("LOWBIT_CACHE_DIR")
    path = Path(root) if root else Path.home() / ".cache" / "lowbit"
    path.mkdir(parents=True, exist_ok=True)
    return path
