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


def as_batches(data: Any, batch_size: int = 64) -> list[Any] | None:
    """Calibration batches from either form of ``data``."""
    if isinstance(data, dict) and "inputs" in data:
        inputs = data["inputs"]
        n = next(iter(inputs.values())).shape[0] if isinstance(inputs, dict) else len(inputs)
        sl = [slice(i, i + batch_size) for i in range(0, n, batch_size)]
        return [{k: v[s] for k, v in inputs.items()} if isinstance(inputs, dict) else inputs[s] for s in sl]
    return data
