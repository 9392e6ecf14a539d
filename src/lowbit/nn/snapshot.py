"""What a cached fast path was built from, and a test (a few microseconds) that all of it still holds.

A fused encoder block keeps the C description of its layers (`lowbit.nn.fused_blocks`) and reuses it while nothing it
was built from changed: no submodule swapped, no parameter or buffer replaced (not even through ``.data =``), no
tensor of a copied layer modified in place (PyTorch's version counters), no forward hook added, the same prepared
kernel state in each layer. Comparing saved copies of those small dicts and tuples costs far less than looking every
part up again, which matters at batch 1, where a block's kernels take a few hundred microseconds.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lowbit.nn.snapshot import Snapshot
    >>> lin = nn.Linear(2, 2)
    >>> snap = Snapshot([lin], copied=[lin], attrs=[])
    >>> snap.holds()
    True
    >>> with torch.no_grad():
    ...     _ = lin.weight.mul_(2)  # an in-place change to a copied layer
    >>> snap.holds()
    False
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence
from itertools import chain
from typing import Any

import torch
import torch.nn.modules.module as _module
from torch import nn

__all__ = ["Snapshot", "global_hooks"]

_data_ptr = torch.Tensor.data_ptr
_version = operator.attrgetter("_version")


def global_hooks() -> bool:
    """Whether any forward hook is registered for all modules (``register_module_forward_hook`` and friends): a path
    that skips submodule calls must not run then."""
    m = _module
    return bool(m._global_forward_hooks or m._global_forward_pre_hooks or m._global_forward_hooks_always_called)


class Snapshot:
    """The state of ``modules`` when it was taken.

    ``holds()`` is True while: each module's submodules, parameters and buffers are the same objects with the same
    storage (data pointers); none of the modules has a forward hook (but those of ``hooks_ignored``, whose hooks run
    anyway, such as the module whose forward uses the snapshot); every tensor of the ``copied`` modules (whose values
    were copied into something cached) has its version (an in-place change through ``.data`` bypasses version
    counters, as it bypasses autograd); and each ``(object, attribute name)`` of ``attrs`` holds the object it held
    (``is``)."""

    def __init__(
        self,
        modules: Sequence[nn.Module],
        copied: Iterable[nn.Module] = (),
        attrs: Iterable[tuple[Any, str]] = (),
        hooks_ignored: Iterable[nn.Module] = (),
    ) -> None:
        mods = list(dict.fromkeys(modules))  # in order, each once
        ignored = set(map(id, hooks_ignored))
        self._dicts = [d for m in mods for d in (m._modules, m._parameters, m._buffers)]
        self._sizes = list(map(len, self._dicts))
        self._entries = list(chain.from_iterable(map(dict.values, self._dicts)))
        self._hooks = [h for m in mods if id(m) not in ignored for h in (m._forward_hooks, m._forward_pre_hooks)]
        self._tensors = [t for m in mods for d in (m._parameters, m._buffers) for t in d.values() if t is not None]
        self._ptrs = list(map(_data_ptr, self._tensors))
        self._copied = [t for m in copied for t in (*m._parameters.values(), *m._buffers.values()) if t is not None]
        self._versions = list(map(_version, self._copied))
        self._attrs = [(obj, name) for obj, name in attrs]
        self._values = [getattr(obj, name) for obj, name in self._attrs]

    def holds(self) -> bool:
        """Whether nothing recorded changed (see the class docstring)."""
        if any(self._hooks) or list(map(len, self._dicts)) != self._sizes:
            return False
        if not all(map(operator.is_, chain.from_iterable(map(dict.values, self._dicts)), self._entries)):
            return False
        if list(map(_data_ptr, self._tensors)) != self._ptrs or list(map(_version, self._copied)) != self._versions:
            return False
        return all(getattr(obj, name) is v for (obj, name), v in zip(self._attrs, self._values, strict=True))
