"""Fused blocks in one C call (``lb_encoder_block``; an encoder's stack of them: ``lb_encoder_stack``): the same
outputs as the Python path of the same kernels, taken once dispatch has decided every layer native, and left for the
Python path otherwise."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator

import pytest
import torch
from torch import nn

import lowbit
from lowbit.kernels import native
from lowbit.kernels.dispatch import use_mode
from lowbit.nn import fused_blocks as fb
from lowbit.nn import fused_model as fm
from lowbit.nn import fused_stack as fs

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not native.available(), reason="native kernels unavailable")


def tiny(kind: str, act: str = "gelu") -> nn.Module:
    torch.manual_seed(0)
    if kind == "vit":
        cfg = transformers.ViTConfig(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=16,
            patch_size=4, hidden_act=act,
        )  # fmt: skip
        cfg._attn_implementation = "sdpa"
        return transformers.ViTModel(cfg, add_pooling_layer=False).eval()
    cfg = transformers.BertConfig(
        vocab_size=50, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=32, hidden_act=act, attn_implementation="sdpa",
    )  # fmt: skip
    return transformers.BertModel(cfg, add_pooling_layer=False).eval()


def inputs(kind: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    if kind == "vit":
        return {"pixel_values": torch.randn(2, 3, 16, 16, generator=g)}
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 7:] = 0
    return {"input_ids": torch.randint(1, 50, (3, 12), generator=g), "attention_mask": mask}


def one_call(f: fb.FusedEncoderForward, x: torch.Tensor, m: dict | None = None) -> torch.Tensor | None:
    """The block's one-call path on ``x`` (None: it does not apply)."""
    m = f.parts_now() if m is None else m
    return f._native_block(m, f.qkv(m["query"], m["key"], m["value"]), x, None)


def run(model: nn.Module, kind: str) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs(kind)).last_hidden_state


W4G32 = {  # every layer at 4 bits (no 8-bit first / last layer): query, key and value concatenate in both blocks
    "name": "w4g32-all",
    "stages": [
        {
            "method": "rtn",
            "keep_first_last": False,
            "weights": {"kind": "int", "bits": 4, "symmetric": False, "granularity": "group", "group_size": 32},
        }
    ],
}


@contextlib.contextmanager
def python_path_only() -> Iterator[None]:
    """Fused blocks on their Python path: no one-call block, no stack in one call."""
    saved = fb.FusedEncoderForward._native_block, fb.FusedEncoderForward.planned, fs.FusedStackForward.one_call
    fb.FusedEncoderForward._native_block = lambda self, *a: None
    fb.FusedEncoderForward.planned = lambda self, *a: None
    fs.FusedStackForward.one_call = lambda self, *a: None
    try:
        yield
    finally:
        fb.FusedEncoderForward._native_block, fb.FusedEncoderForward.planned, fs.FusedStackForward.one_call = saved


@contextlib.contextmanager
def counted_c_calls() -> Iterator[dict[str, int]]:
    """How often the one-call entry points of the native library run."""
    lib = native._need()
    counts = {"lb_encoder_block": 0, "lb_encoder_stack": 0}
    saved = {name: getattr(lib, name) for name in counts}

    def counting(name):
        def call(*args):
            counts[name] += 1
            return saved[name](*args)

        return call

    for name in counts:
        setattr(lib, name, counting(name))
    try:
        yield counts
    finally:
        for name, fn in saved.items():
            setattr(lib, name, fn)


def saved_and_loaded(model: nn.Module) -> nn.Module:
    """``model`` through ``torch.save`` / ``torch.load`` (a pickle, as users save whole models)."""
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def check_one_call(kind: str, preset: object, acts: str = "exact") -> None:
    """Pack a tiny model and run it in ``native`` mode (every layer on its kernel; ``auto`` could pick dense at these
    tiny shapes): once the kernels are prepared, each block runs in one C call (a BERT encoder: all its blocks in
    one), with the same outputs bit for bit as the Python path of the same kernels."""
    act = {"tanh": "gelu_pytorch_tanh", "relu": "relu"}.get(acts.partition("-")[2], "gelu")
    q = lowbit.compress(tiny(kind, act), preset, data=[inputs(kind)], progress=False)  # (static presets calibrate)
    model = lowbit.pack(q, kernel_activations=acts.split("-")[0])
    assert len(fs.stacked_encoders(model)) == (1 if kind == "bert" else 0)  # ViTModel loops over its blocks itself
    fm.unfuse_encoder_models(model)  # transformers' embeddings on both paths (their own pass: test_fused_model)
    with use_mode("native"):
        with python_path_only():
            python = run(model, kind)
        with counted_c_calls() as calls:
            run(model, kind)  # describes the blocks (kernels prepared by the probes)
            calls.update(dict.fromkeys(calls, 0))
            fast = run(model, kind)
        assert calls == ({"lb_encoder_block": 0, "lb_encoder_stack": 1} if kind == "bert" else
                         {"lb_encoder_block": 2, "lb_encoder_stack": 0})  # fmt: skip
        torch.testing.assert_close(fast, python, rtol=0, atol=0)  # the same kernels in the same order


@pytest.mark.parametrize("kind", ["bert", "vit"])
@pytest.mark.parametrize(
    "preset,acts",
    [("w8a8", "exact"), (W4G32, "int8"), ("w8a8", "exact-tanh"), ("w8a8", "exact-relu"), ("w8a8-static", "exact")],
)
def test_one_call_block_equals_the_python_path(kind, preset, acts):
    check_one_call(kind, preset, acts)


@pytest.mark.parametrize("preset", ["w8a8", W4G32, "fp8"])
def test_layers_with_input_scales_keep_the_one_call_path(preset):
    """Explicit per-channel input scales (AWQ / SmoothQuant where no LayerNorm absorbs them) are applied by the
    kernels themselves: the encoder still runs in one C call, equal to the Python path of the same kernels and
    close to the reference forward. FP8 layers (their bytes decoded in the fp32 kernel) fuse as well."""
    model = lowbit.pack(lowbit.compress(tiny("bert"), preset, progress=False))
    g = torch.Generator().manual_seed(2)
    for _, f in fb.fused_blocks(model):
        m = f.parts_now()
        s = torch.rand(64, generator=g) + 0.5
        for role in ("query", "key", "value"):  # one vector: they still concatenate
            m[role].set_input_scale(s)
        m["fc2"].set_input_scale(torch.rand(128, generator=g) + 0.5)
    fm.unfuse_encoder_models(model)
    with use_mode("reference"):
        reference = run(model, "bert")
    with use_mode("native"):
        with python_path_only():
            python = run(model, "bert")
        with counted_c_calls() as calls:
            run(model, "bert")
            calls.update(dict.fromkeys(calls, 0))
            fast = run(model, "bert")
    assert calls == {"lb_encoder_block": 0, "lb_encoder_stack": 1}
    torch.testing.assert_close(fast, python, rtol=0, atol=0)
    joints = [f._qkv for _, f in fb.fused_blocks(model)]
    assert None not in joints
    run(model, "bert")
    assert [f._qkv for _, f in fb.fused_blocks(model)] == joints  # not rebuilt: the calls modify none of their tensors
    rel = float((fast - reference).norm() / reference.norm())
    assert rel < (0.05 if preset == "w8a8" else 1e-5), rel  # (int8 activation rounding flips; weight-only: fp32 sums)


def test_layers_not_on_their_kernels_keep_the_python_path(monkeypatch):
    model = lowbit.pack(lowbit.compress(tiny("bert"), "w8a8", progress=False))
    run(model, "bert")
    with use_mode("reference"):  # dispatch runs the reference path: no layer is native
        taken = [one_call(f, torch.randn(3, 12, 64)) for _, f in fb.fused_blocks(model)]
    assert taken == [None, None]
    silu = lowbit.pack(lowbit.compress(tiny("bert", "silu"), "w8a8", progress=False))  # no native SiLU
    with use_mode("native"):
        run(silu, "bert")
        x = torch.randn(3, 12, 64)
        blocks = fb.fused_blocks(silu)
        assert len(blocks) == 2 and all(one_call(f, x) is None for _, f in blocks)


@pytest.mark.usefixtures("auto_mode")
def test_auto_mode_takes_the_one_call_path_once_dispatch_decided_native():
    """In ``auto`` mode a block goes to C for a row count every layer was decided for: at once where all were decided
    native, else where the block's own race (one call against the Python path) picked the one call."""
    model = lowbit.pack(lowbit.compress(tiny("bert"), "w8a8", progress=False))
    run(model, "bert")  # dispatch measures every layer at 36 rows
    blocks = [f for _, f in fb.fused_blocks(model)]
    x = torch.randn(3, 12, 64)
    for f in blocks:
        m = f.parts_now()
        layers = (f.qkv(m["query"], m["key"], m["value"]), m["attn_out"], m["fc1"], m["fc2"])
        all_native = all(layer._dispatch.decided.get((36, torch.get_num_threads())) for layer in layers)
        got = one_call(f, x, m)
        raced = [won for key, won in f._chain.items() if key[0] == 64]  # (36 rows: batch bucket 64)
        assert (got is not None) == (all_native or raced == [True])
        assert one_call(f, torch.randn(1, 5, 64), m) is None  # 5 rows: not decided yet


@pytest.mark.usefixtures("auto_mode")
@pytest.mark.parametrize("one_call_wins", [True, False])
def test_a_block_with_layers_decided_dense_races_its_one_call(monkeypatch, one_call_wins):
    """A layer that runs dense alone (its call overhead outweighs the kernel) still runs its kernel inside the one C
    call when the block's race says the whole call is faster; the race runs once per row count."""
    model = lowbit.pack(lowbit.compress(tiny("bert"), "w8a8", progress=False))
    fm.unfuse_encoder_models(model)
    run(model, "bert")
    f = fb.fused_blocks(model)[0][1]
    m = f.parts_now()
    threads = torch.get_num_threads()
    fc2 = m["fc2"]._dispatch
    for layer in (f.qkv(m["query"], m["key"], m["value"]), m["attn_out"], m["fc1"]):
        layer._dispatch.decided[(36, threads)] = True
    fc2.decided[(36, threads)] = False  # as if dense had won its race
    fc2.state = None  # (dispatch drops the kernel layout of a layer that only runs dense)
    races = []

    def race(*fns):
        races.append(len(fns))
        return [1.0, 2.0] if one_call_wins else [2.0, 1.0]

    monkeypatch.setattr(fb, "race", race)
    x = torch.randn(3, 12, 64)
    with torch.no_grad():
        got = one_call(f, x, m)
        again = one_call(f, x, m)
    assert races == [2]
    assert (got is not None) == one_call_wins and (again is not None) == one_call_wins
    assert (fc2.state is not None) == one_call_wins  # prepared for the race, kept only for the one call


def test_a_wrong_width_input_gets_the_layers_error_not_a_c_call():
    model = lowbit.pack(lowbit.compress(tiny("bert"), "w8a8", progress=False))
    with use_mode("native"):
        run(model, "bert")
        run(model, "bert")
        f = fb.fused_blocks(model)[0][1]
        assert one_call(f, torch.randn(1, 5, 32)) is None
        with pytest.raises((RuntimeError, ValueError)):
            f(torch.randn(1, 5, 32))


def test_query_key_value_that_cannot_be_concatenated_run_as_three_layers_in_the_one_call():
    """With the first layer kept at 8 bits, block 0's query is int8 and its key / value 4-bit: no concatenation, so
    the C block runs the three layers one by one (into their own thirds of its buffer), still bit for bit."""
    keep = {**W4G32, "stages": [{**W4G32["stages"][0], "keep_first_last": True}]}
    check_one_call("bert", keep, "int8")
    model = lowbit.pack(lowbit.compress(tiny("bert"), keep, progress=False), kernel_activations="int8")
    assert [f.joint_qkv() for _, f in fb.fused_blocks(model)] == [False, True]
