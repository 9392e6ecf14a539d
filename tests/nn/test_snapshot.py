"""`Snapshot`: holds while nothing a cached fast path was built from changes, and not after any change of it."""

from __future__ import annotations

import torch
from torch import nn

from lowbit.nn.snapshot import Snapshot, global_hooks


def model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))


def snap(m: nn.Sequential, hooked: list | None = None) -> Snapshot:
    """The Linear is copied somewhere, the LayerNorm read in place."""
    hooked = [m, m[0], m[1]] if hooked is None else hooked
    return Snapshot(containers=[m], read=[m[1]], copied=[m[0]], hooked=hooked, attrs=[(m[1], "eps")])


def test_holds_while_nothing_changes_and_after_calls():
    m = model()
    s = snap(m)
    m(torch.randn(2, 4))
    assert s.holds()


def test_a_swapped_submodule_breaks_it():
    m = model()
    s = snap(m)
    m[1] = nn.LayerNorm(4)
    assert not s.holds()


def test_a_replaced_parameter_or_its_storage_breaks_it():
    m = model()
    s = snap(m)
    m[1].weight = nn.Parameter(torch.ones(4))  # the same value, another tensor
    assert not s.holds()
    m = model()
    s = snap(m)
    m[1].bias.data = torch.zeros(4)  # the same Parameter, new storage
    assert not s.holds()


def test_a_copied_tensor_is_followed_too():
    buf = torch.zeros(3)
    s = Snapshot(copied=[buf])
    buf.add_(1)
    assert not s.holds()


def test_in_place_changes_break_it_for_copied_modules_only():
    m = model()
    s = snap(m)
    with torch.no_grad():
        m[1].weight.mul_(2)  # not copied: a reader of its storage sees the change
    assert s.holds()
    with torch.no_grad():
        m[0].weight.add_(1)  # copied into a cache: the cache is stale
    assert not s.holds()


def test_hooks_break_it_on_the_hooked_modules():
    m = model()
    s, t = snap(m), snap(m, hooked=[m[0], m[1]])
    h = m[0].register_forward_pre_hook(lambda mod, args: None)
    assert not s.holds() and not t.holds()
    h.remove()
    assert s.holds()
    h = m.register_forward_hook(lambda mod, args, out: None)
    assert not s.holds() and t.holds()
    h.remove()


def test_an_attribute_bound_to_another_object_breaks_it():
    m = model()
    s = snap(m)
    m[1].eps = 1e-3
    assert not s.holds()


def test_global_hooks_are_seen():
    assert not global_hooks()
    h = nn.modules.module.register_module_forward_hook(lambda mod, args, out: None)
    try:
        assert global_hooks()
    finally:
        h.remove()
    assert not global_hooks()
