"""What a cached fast path was built from, and a test (a few microseconds) that all of it still holds.

A fused encoder block keeps the C description of its layers (`lowbit.nn.fused_blocks`) and reuses it while nothing it
was built from changed: no submodule swapped, no parameter replaced (not even through ``.data =``), no parameter of a
copied layer modified in place (PyTorch's version counters), no forward hook added, the same prepared kernels in each
layer. Comparing saved lists of those objects costs far less than looking every part up again, which matters at batch
1, where a block's kernels take a few hundred microseconds.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lowbit.nn.snapshot import Snapshot
    >>> lin = nn.Linear(2, 2)
    >>> snap = Snapshot(copied=[lin], hooked=[lin])
    >>> snap.holds()
    True
    >>> with torch.no_grad():
    ...     _ = lin.weight.mul_(2)  # an in-place change to a copied layer
    >>> snap.holds()
    False
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
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
    """What a cached path reads from a set of modules, as it was; ``holds()`` says whether it still is.

    ``holds()`` is True while: the ``containers`` hold the same submodules; the ``read`` modules (whose parameters the
    cached path reads in place, through pointers) hold the same parameters, on the same storage; the parameters of the
    ``copied`` modules (copied into something cached, or checked once) and the ``copied`` tensors keep their versions
    too (an in-place change through ``.data`` bypasses version counters, as it bypasses autograd); none of the
    ``hooked`` modules has a forward hook; and each ``(object, attribute name)`` of ``attrs`` holds the object it held
    (``is``).

    Each test is a C-level loop over a few small lists: a transformer block's snapshot takes a few microseconds.
    Buffers are not followed: a packed layer's kernels are prepared from its buffers once
    (`lowbit.kernels.dispatch`), so name its ``_dispatch`` in ``attrs`` to follow what its own forward would use."""

    def __init__(
        self,
        containers: Iterable[nn.Module] = (),
        read: Iterable[nn.Module] = (),
        copied: Iterable[nn.Module | torch.Tensor] = (),
        hooked: Iterable[nn.Module] = (),
        attrs: Iterable[tuple[Any, str]] = (),
    ) -> None:
        def unique(mods: Iterable[nn.Module]) -> list[nn.Module]:
            return list({id(m): m for m in mods}.values())

        copied = list(copied)
        copied_mods = unique(c for c in copied if isinstance(c, nn.Module))
        read = unique([*read, *copied_mods])
        self._dicts = [m._modules for m in unique(containers)] + [m._parameters for m in read]
        self._sizes = list(map(len, self._dicts))
        self._entries = list(chain.from_iterable(map(dict.values, self._dicts)))
        self._tensors = [t for m in read for t in m._parameters.values() if t is not None]
        self._ptrs = list(map(_data_ptr, self._tensors))
        self._copied = [t for m in copied_mods for t in m._parameters.values() if t is not None]
        self._copied += [t for t in copied if isinstance(t, torch.Tensor)]
        self._versions = list(map(_version, self._copied))
        self._hooks = [h for m in unique(hooked) for h in (m._forward_hooks, m._forward_pre_hooks)]
        self._attrs = list(attrs)
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
