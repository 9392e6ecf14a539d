"""Packed storage: bit-exact pack/unpack for every format, identical outputs, file size at the format's bits."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowbit
from lowbit.errors import CheckpointError
from lowbit.formats import FORMATS
from lowbit.formats.packing import code_offset, pack_codes, unpack_codes
from lowbit.io import load, save
from lowbit.kernels.dispatch import use_mode
from lowbit.measure.size import model_size
from lowbit.nn.packed import PackedConv2d, PackedLinear
from lowbit.recipe import Recipe


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_pack_unpack_is_bit_exact(name: str) -> None:
    from lowbit.formats import quantize

    qt = quantize(torch.randn(7, 45), FORMATS[name])
    bits, signed = code_offset(FORMATS[name])
    packed = pack_codes(qt.codes, bits, signed)
    assert packed.numel() == (7 * 45 * bits + 7) // 8
    assert torch.equal(unpack_codes(packed, (7, 45), bits, signed), qt.codes)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("count", [1, 7, 64, 333])
def test_unpack_inverts_pack_at_every_width_over_the_whole_range(bits: int, signed: bool, count: int) -> None:
    """Every code of every width from 1 to 8 bits, both ends of the range included, comes back at its place and in
    the unpacked dtype (int8 signed, uint8 unsigned), whether a width divides a byte (shifted out) or not (codes
    straddling bytes); a byte count that does not fit is refused."""
    gen = torch.Generator().manual_seed(bits * 1000 + count)
    if bits == 1 and signed:
        q = torch.randint(0, 2, (count,), generator=gen) * 2 - 1
        q[:2] = torch.tensor([-1, 1])[: min(2, count)]
    else:
        lo, hi = (-(1 << (bits - 1)), 1 << (bits - 1)) if signed else (0, 1 << bits)
        q = torch.randint(lo, hi, (count,), generator=gen)
        q[: min(2, count)] = torch.tensor([lo, hi - 1])[: min(2, count)]
    q = q.to(torch.int8 if signed else torch.uint8).reshape(1, count)
    packed = pack_codes(q, bits, signed)
    got = unpack_codes(packed, (1, count), bits, signed)
    assert got.dtype == q.dtype and torch.equal(got, q)
    with pytest.raises(ValueError, match="expected"):
        unpack_codes(torch.cat([packed, packed[:1]]), (1, count), bits, signed)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 256),
        nn.ReLU(),
        nn.Linear(256, 256),
        nn.ReLU(),
        nn.Linear(256, 3),
    ).eval()


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_packed_model_equals_simulated_and_file_is_small(tmp_path, name: str) -> None:
    base = _model()
    recipe = Recipe.from_dict({"stages": [{"method": "rtn", "weights": name, "keep_first_last": False}]})
    q = lowbit.compress(base, recipe, progress=False)
    p = lowbit.pack(q)
    assert isinstance(p[2], PackedConv2d) and isinstance(p[6], PackedLinear)
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        with use_mode("reference"):  # the reference kernel computes exactly what the simulated model does
            assert torch.equal(p(x), q(x))
        with use_mode("native"):  # native kernels (where the format has one) agree up to float rounding
            want = q(x)
            assert float((p(x) - want).abs().max()) <= 1e-5 * float(want.abs().max())
    save(p, tmp_path / "ck")
    expected_bytes = model_size(p).total_bytes
    actual = (tmp_path / "ck" / "model.safetensors").stat().st_size
    header = 4096  # safetensors JSON header: tensor names and offsets
    assert actual <= expected_bytes * 1.02 + header
    p2 = load(tmp_path / "ck", model=base)
    with torch.no_grad(), use_mode("reference"):
        assert torch.equal(p2(x), q(x))


def test_packed_checkpoint_shape_mismatch_is_refused(tmp_path) -> None:
    import json

    base = _model()
    p = lowbit.pack(lowbit.compress(base, "w4g128", progress=False))
    save(p, tmp_path / "ck")
    spec_path = tmp_path / "ck" / "lowbit.json"
    spec = json.loads(spec_path.read_text())
    key = next(k for k in spec["tensors"] if k.endswith("packed_codes"))
    spec["tensors"][key]["shape"] = [spec["tensors"][key]["shape"][0] + 1]
    spec_path.write_text(json.dumps(spec))
    with pytest.raises(CheckpointError, match="wrong shape"):
        load(tmp_path / "ck", model=base)


@pytest.mark.parametrize(("weights", "acts"), [("int4_g128", None), ("int8", "int8_token"), ("binary", "binary_token")])
def test_packed_conv_keeps_its_weight_view_until_the_weights_change(weights: str, acts: str | None) -> None:
    """PackedConv2d's forward keeps a 4-D view of its cached weight (weight-only) or its dispatch state (per-patch
    activations, here on the reference kernel): every call equals the simulated conv bit for bit, and loading other
    weights is seen at once."""
    base = _model()
    stage = {"method": "rtn", "weights": weights, "activations": acts, "keep_first_last": False}
    recipe = Recipe.from_dict({"stages": [stage]})
    q = lowbit.compress(base, recipe, progress=False)
    p = lowbit.pack(q)
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad(), use_mode("reference" if acts else "auto"):
        for _ in range(3):
            assert torch.equal(p[2](p[1](p[0](x))), q[2](q[1](q[0](x))))
        torch.manual_seed(1)
        other = lowbit.pack(lowbit.compress(_model().apply(_reinit), recipe, progress=False))
        p[2].load_state_dict(other[2].state_dict())
        h = torch.randn(4, 16, 6, 6)
        assert torch.equal(p[2](h), other[2](h)) and not torch.equal(p[2](h), q[2](h))


def _reinit(m: nn.Module) -> None:
    if isinstance(m, (nn.Conv2d, nn.Linear)):
        m.reset_parameters()
