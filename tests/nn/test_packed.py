"""Packed layers' forwards (`lowbit.nn.packed`) outside the kernels: the weight-only conv's short path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowbit
from lowbit.formats import FORMATS
from lowbit.formats.packing import code_offset, packed_nbytes
from lowbit.recipe import Recipe, Stage


@pytest.mark.parametrize("weights", sorted(FORMATS))
@pytest.mark.parametrize("conv", [False, True])
def test_packed_layers_hold_their_codes_packed_only(weights: str, conv: bool) -> None:
    """A packed layer's buffers are its packed codes and its scales (and zero points), nothing a weight wide: no
    unpacked byte-a-code copy. ``codes`` still reads the simulated layer's codes, unpacked on demand, and the output
    is the simulated layer's bit for bit on the reference path."""
    from lowbit.kernels.dispatch import use_mode

    torch.manual_seed(0)
    stage = Stage(method="rtn", weights=FORMATS[weights], keep_first_last=False)
    model = nn.Sequential(nn.Conv2d(12, 40, 3) if conv else nn.Linear(96, 40))
    q = lowbit.compress(model, Recipe(stages=(stage,)), progress=False)
    layer = lowbit.pack(q)[0]
    rows, cols = layer._matrix_shape
    assert layer._buffers["codes"] is None and "codes" not in dict(layer.named_buffers())
    codes = layer.codes
    assert codes.dtype == q[0].codes.dtype and torch.equal(codes, q[0].codes)
    bits, _ = code_offset(FORMATS[weights])
    held = sum(b.numel() * b.element_size() for b in layer.buffers())
    per_unit = 4 + 2 + (8 if layer.zero is not None else 0)  # fp32 scale, fp16 packed scale, zero point both ways
    assert held <= packed_nbytes(rows * cols, bits) + per_unit * layer.scale.numel() + 64
    x = torch.randn(3, 12, 5, 5) if conv else torch.randn(3, 96)
    with torch.no_grad(), use_mode("reference"):
        assert torch.equal(layer(x), q(x))


@pytest.mark.parametrize("bias", [True, False])
def test_weight_only_conv_runs_the_conv_on_its_cached_weight_and_follows_new_weights(bias: bool) -> None:
    """A weight-only packed conv with no kernel route (int4 in groups of 32 on 36-value patches) is one conv on its
    cached dequantized weight: the simulated layer's
    output bit for bit, and still after its codes change (the cache, and with it the short path, is dropped)."""
    torch.manual_seed(0)
    recipe = Recipe(stages=(Stage(method="rtn", weights=FORMATS["int4_g32"]),))
    q = lowbit.compress(nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, bias=bias)), recipe, progress=False)
    p = lowbit.pack(q)
    x = torch.randn(2, 4, 6, 7)
    with torch.no_grad():
        assert torch.equal(p(x), q(x)) and torch.equal(p(x), q(x))  # (the second call takes the short path)
        assert p[0]._conv_weight[1] is p[0]._cache  # its weight is the cached one
        before = p(x)
        qt = q[0].qweight()
        flipped = type(qt)(qt.codes.flip(0), qt.scale.flip(0), qt.zero.flip(0), qt.spec)
        for layer in (q[0], p[0]):
            layer.set_qweight(flipped)
        assert torch.equal(p(x), q(x)) and not torch.equal(p(x), before)


@pytest.mark.parametrize("groups", [1, 2])  # 1: a kernel route (raced, either path); 2: none (the short path)
def test_weight_only_conv_short_path_reads_the_bias_as_the_layer_does(groups: int) -> None:
    """A bias set later as a plain tensor (the layer was built without one) is added on every call, on the conv on
    the cached weight (bit for bit the simulated layer) and on the kernel's one C call (up to summation order)."""
    from lowbit.kernels import dispatch

    torch.manual_seed(0)
    recipe = Recipe(stages=(Stage(method="rtn", weights=FORMATS["int8"]),))
    q = lowbit.compress(nn.Sequential(nn.Conv2d(4, 8, 3, bias=False, groups=groups)), recipe, progress=False)
    p = lowbit.pack(q)
    for layer in (q[0], p[0]):
        layer.bias = torch.full((8,), 10.0)
    x = torch.randn(2, 4, 6, 7)
    with torch.no_grad():
        want = q(x)
        outs = [p(x) for _ in range(3)]
        disp = p[0]._dispatch
        if disp and dispatch.mode() == "auto":  # decided native: the one C call
            disp.decided = dict.fromkeys(disp.decided, True)
            disp.state = disp.state or disp.prepare(p[0], True)
            assert disp.hot_conv(p[0], x, p[0]._im2col[(x.shape, x.stride())]) is not None
            outs.append(p(x))
    if groups == 1:
        assert all(float((y - want).abs().max()) <= 2e-5 * float(want.abs().max()) for y in outs)
    else:
        assert disp is None and all(torch.equal(y, want) for y in outs)


@pytest.mark.usefixtures("auto_mode")
def test_decided_linear_reads_a_bias_set_later_as_a_plain_tensor() -> None:
    """A linear layer built without bias, given one later as a plain tensor: the decided call (one C call or one
    F.linear) adds it, as the simulated layer does."""
    from lowbit.formats import ACT_FORMATS
    from lowbit.kernels import dispatch

    torch.manual_seed(0)
    recipe = Recipe(stages=(Stage(method="rtn", weights=FORMATS["int8"], activations=ACT_FORMATS["int8_token"]),))
    q = lowbit.compress(nn.Sequential(nn.Linear(64, 8, bias=False)), recipe, progress=False)
    p = lowbit.pack(q)
    for layer in (q[0], p[0]):
        layer.bias = torch.full((8,), 10.0)
    x = torch.randn(3, 64)
    with torch.no_grad():
        want = q(x)
        outs = [p(x) for _ in range(3)]  # measured, then decided
        disp = p[0]._dispatch
    assert disp and disp.decided and dispatch.layer_bias(p[0]) is p[0].bias
    if dispatch.mode() == "auto":  # decided native: the one C call of `LayerDispatch.hot`
        disp.decided = dict.fromkeys(disp.decided, True)
        disp.state = disp.state or disp.route.prepare(p[0])
        with torch.no_grad():
            assert disp.hot(p[0], x) is not None
            outs.append(p(x))
    for y in outs:
        assert float((y - want).abs().max()) <= 2e-5 * float(want.abs().max())


def _weight_only_conv(c: int = 8) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    recipe = Recipe(stages=(Stage(method="rtn", weights=FORMATS["int8"]),))
    q = lowbit.compress(nn.Sequential(nn.Conv2d(c, 8, 3, padding=1)), recipe, progress=False)
    return q, lowbit.pack(q)


def test_weight_only_conv_takes_unbatched_and_autograd_inputs_on_the_map_conv() -> None:
    """Inputs the kernel cannot serve -- an unbatched (C, H, W) map, autograd -- run the conv on the map at once,
    as nn.Conv2d and the simulated layer do, without cutting patches only to discard them."""
    q, p = _weight_only_conv()
    x3 = torch.randn(8, 10, 10)
    with torch.no_grad():
        assert torch.equal(p(x3), q(x3)) and torch.equal(p(x3), q(x3))
    xg = torch.randn(2, 8, 10, 10, requires_grad=True)
    for _ in range(2):
        y = p(xg)
        (g,) = torch.autograd.grad(y.sum(), xg)
        (want,) = torch.autograd.grad(q(xg).sum(), xg)
        assert torch.equal(y, q(xg)) and torch.equal(g, want)
    assert not p[0]._im2col  # no patches were cut


def test_weight_only_conv_with_an_input_scale_runs_the_map_conv() -> None:
    """A weight-only conv with an input scale (AWQ) keeps the map conv: bit for bit the simulated layer, no patches."""
    q, p = _weight_only_conv()
    scale = torch.rand(8) + 0.5
    for layer in (q[0], p[0]):
        layer.set_input_scale(scale)
    x = torch.randn(2, 8, 10, 10)
    with torch.no_grad():
        assert all(torch.equal(p(x), q(x)) for _ in range(3))
    assert not p[0]._im2col


@pytest.mark.usefixtures("auto_mode")
def test_a_conv_decided_native_drops_its_dequantized_weight(monkeypatch) -> None:
    """Dispatch frees the fp32 weight of a layer decided native: the conv's 4-D view of it goes too."""
    from lowbit.kernels import dispatch

    q, p = _weight_only_conv(1)
    x = torch.randn(4, 1, 10, 10)
    with torch.no_grad():
        with dispatch.use_mode("reference"):
            p(x), p(x)  # the conv on the cached weight: its 4-D view is kept
        assert p[0]._conv_weight[1] is not None
        monkeypatch.setattr(dispatch, "race", lambda *fns: [fn() for fn in fns] and [1.0, 2.0, 3.0])  # native wins
        y = p(x)
        want = q(x)
    decided = p[0]._dispatch.decided
    assert decided and all(decided.values())
    assert p[0]._cache is None and p[0]._conv_weight == (None, None)
    assert float((y - want).abs().max()) <= 2e-5 * float(want.abs().max())


def _packed_w4() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    stage = Stage(method="rtn", weights=FORMATS["int4_g32"], keep_first_last=False)
    q = lowbit.compress(nn.Sequential(nn.Linear(64, 24)), Recipe(stages=(stage,)), progress=False)
    return q, lowbit.pack(q)


def test_a_layer_pickled_with_unpacked_codes_drops_them_when_loaded() -> None:
    """A packed layer pickled while layers still kept an unpacked copy of their codes (before session 25) comes back
    without it: ``codes`` reads the packed bytes, so new weights loaded later are the ones it computes with."""
    import pickle

    q, p = _packed_w4()
    layer = p[0]
    layer._buffers["codes"] = torch.zeros(24, 64, dtype=torch.uint8)  # (what such a pickle holds)
    back = pickle.loads(pickle.dumps(layer))
    assert back._buffers["codes"] is None and torch.equal(back.codes, q[0].codes)


def test_set_qweight_refuses_codes_out_of_range_before_changing_anything() -> None:
    from lowbit.kernels.dispatch import use_mode

    q, p = _packed_w4()
    x = torch.randn(2, 64)
    with torch.no_grad(), use_mode("reference"):
        before = p(x)
    qt = q[0].qweight()
    bad = type(qt)(torch.full_like(qt.codes, 16), qt.scale * 2, qt.zero, qt.spec)  # 16 does not fit 4 bits
    with pytest.raises(ValueError, match="do not fit"):
        p[0].set_qweight(bad)
    with torch.no_grad(), use_mode("reference"):
        assert torch.equal(p(x), before) and torch.equal(p[0].scale, qt.scale)


def test_a_fresh_packed_layer_compiles_as_one_graph_on_the_reference_path() -> None:
    """``torch.compile(fullgraph=True)`` of a packed layer whose weight is not cached yet: the codes are unpacked
    inside the graph (torch operations, sizes known while tracing), the simulated layer's output."""
    from lowbit.kernels.dispatch import use_mode

    q, p = _packed_w4()
    x = torch.randn(3, 64)
    with torch.no_grad(), use_mode("reference"):
        assert p[0]._cache is None
        got = torch.compile(p, fullgraph=True, backend="eager")(x)
        assert torch.equal(got, q(x))


def test_a_packed_models_size_is_measured_without_unpacking_its_codes(monkeypatch) -> None:
    """`model_size` counts a packed layer's bits from its shape, scales and zero points: the same bits as the
    simulated model's, with no layer's codes unpacked (a large model's report would unpack every layer)."""
    from lowbit.measure.size import model_size
    from lowbit.nn.packed import PackedMixin

    q, p = _packed_w4()

    def refuse(self):
        raise AssertionError("codes unpacked")

    monkeypatch.setattr(PackedMixin, "_unpacked_codes", refuse)
    assert model_size(p) == model_size(q)
