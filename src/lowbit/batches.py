"""How lowbit feeds a batch to a model: a tensor is passed positionally, a dict as keyword arguments.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lowbit.batches import run_model
    >>> run_model(nn.Linear(4, 2), torch.zeros(3, 4)).shape
    torch.Size([3, 2])
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

Batch = torch.Tensor | dict[str, torch.Tensor]


def run_model(model: nn.Module, batch: Batch) -> Any:
    """``model(**batch)`` for a dict, else ``model(batch)``."""
    return model(**batch) if isinstance(batch, dict) else model(batch)
