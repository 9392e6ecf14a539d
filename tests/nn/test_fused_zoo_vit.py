"""lowbit's own ViT block (`lowbit.zoo.vit.Block`, the digits / Fashion-MNIST ViTs) fused: only as one C call, which
computes its pre-norm block with lowbit's attention and element-wise passes; everything else keeps its forward."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lowbit
from lowbit.kernels import native
from lowbit.kernels.dispatch import use_mode
from lowbit.nn import fused_blocks as fb
from lowbit.zoo.vit import ConvStemViT
from tests.nn.test_fused_native import W4G32, counted_c_calls

pytestmark = pytest.mark.skipif(not native.available(), reason="native kernels unavailable")


def zoo_vit() -> nn.Module:
    torch.manual_seed(0)
    return ConvStemViT(nn.Conv2d(1, 64, 4, stride=4), tokens=16, dim=64, depth=2, heads=4, mlp=128).eval()


def images() -> torch.Tensor:
    return torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("preset", ["w8a8", W4G32])
def test_lowbit_vit_blocks_run_in_one_c_call(preset):
    model = lowbit.pack(lowbit.compress(zoo_vit(), preset, progress=False))
    assert [(name, f.layout.name) for name, f in fb.fused_blocks(model)] == [
        ("blocks.0", "lowbit-vit"),
        ("blocks.1", "lowbit-vit"),
    ]
    plain = copy.deepcopy(model)
    fb.unfuse_encoder_blocks(plain)
    with torch.no_grad(), use_mode("native"):
        ref = plain(images())
        model(images())  # (the stem's transposed tokens reach the blocks strided: copied for the C call)
        with counted_c_calls() as calls:
            out = model(images())
    assert calls["lb_encoder_block"] == 2
    if preset is W4G32:  # float inputs: lowbit's attention / LayerNorm / GELU differ from PyTorch's by float rounding
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    else:  # int8 inputs: a value that rounds the other way moves a few outputs by a quantization step
        assert float(torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref)) < 1e-2


@pytest.mark.usefixtures("auto_mode")
@pytest.mark.parametrize("one_call_wins", [True, False])
def test_auto_mode_runs_the_one_call_where_its_layers_are_native_or_the_block_race_says_so(monkeypatch, one_call_wins):
    """At 32 rows dispatch may keep some tiny layers dense alone; a block runs in one C call where all its layers
    were decided native, or where its own race (one call against its forward) picked the one call."""
    monkeypatch.setattr(fb, "race", lambda *fns: [1.0, 2.0] if one_call_wins else [2.0, 1.0])
    model = lowbit.pack(lowbit.compress(zoo_vit(), "w8a8", progress=False))
    with torch.no_grad():
        for _ in range(3):  # layers decide, blocks race, blocks describe
            model(images())
        with counted_c_calls() as calls:
            model(images())
    threads = torch.get_num_threads()
    native_blocks = 0
    for _, f in fb.fused_blocks(model):
        m = f.parts_now()
        layers = (m["qkv"], m["attn_out"], m["fc1"], m["fc2"])
        native_blocks += all(ly._dispatch.decided[(32, threads)] for ly in layers)
    assert calls["lb_encoder_block"] == (2 if one_call_wins else native_blocks)


def test_a_hook_or_no_kernel_keeps_the_blocks_own_forward():
    model = lowbit.pack(lowbit.compress(zoo_vit(), "w8a8", progress=False))
    seen = []
    model.blocks[0].attn.register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    with torch.no_grad(), use_mode("native"), counted_c_calls() as calls:
        model(images())
        model(images())
    assert calls["lb_encoder_block"] == 2 and len(seen) == 2  # block 0 on its own forward, block 1 in C
    assert fb.fuse_encoder_blocks(zoo_vit()) == 0  # fp32 layers: no C call, and no faster Python path


def test_fusing_probes_leave_no_rows_in_the_dispatch_report():
    """The probes run every layer on its kernel (``native`` mode) at a tiny shape; what dispatch reports per layer
    (`lowbit inspect --packed`) keeps only measured rows."""
    from lowbit.kernels.dispatch import layer_report
    from tests.nn.test_fused_native import tiny

    for model in (zoo_vit(), tiny("bert")):
        packed = lowbit.pack(lowbit.compress(model, "w8a8", progress=False))
        assert fb.fused_blocks(packed)
        for layer in packed.modules():
            if getattr(layer, "_dispatch", None):
                assert [r["path"] for r in layer_report(layer)] == ["not run yet"]
