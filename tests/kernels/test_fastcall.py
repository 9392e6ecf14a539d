"""The CPython entry for the per-call kernels (`lowbit.kernels.fastcall`): same results as the ctypes binding."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch
from torch import nn

import lowbit
from lowbit.formats import ACT_FORMATS, FORMATS
from lowbit.kernels import dispatch, fastcall, native
from lowbit.kernels.dispatch import LayerDispatch, use_mode
from lowbit.recipe import Recipe, Stage

pytestmark = pytest.mark.skipif(fastcall.linear is None, reason=f"no fast call entry here: {fastcall.reason}")


def packed(module: nn.Module, x: torch.Tensor) -> nn.Module:
    torch.manual_seed(0)
    recipe = Recipe(stages=(Stage(method="rtn", weights=FORMATS["int8"], activations=ACT_FORMATS["int8_token"]),))
    layer = lowbit.pack(lowbit.compress(nn.Sequential(module), recipe, data=[x], progress=False))[0]
    with torch.no_grad(), use_mode("native"):
        layer(x)  # prepares the kernel's weights
    return layer


def test_fast_linear_and_conv_equal_the_ctypes_calls() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 128)
    layer = packed(nn.Linear(128, 10), x)
    st = layer._dispatch.state
    ys = [torch.empty(3, 10), torch.empty(3, 10)]
    for fn, y in zip((fastcall.linear, native._need().lb_linear), ys, strict=True):
        assert fn(st.addr, x.data_ptr(), 3, y.data_ptr(), 1, layer.bias.data_ptr()) == 0
    assert torch.equal(ys[0], ys[1])
    for fn in (fastcall.linear, native._need().lb_linear):  # no bias: None
        assert fn(st.addr, x.data_ptr(), 3, ys[0].data_ptr(), 1, None) == 0
        assert torch.equal(ys[0] + layer.bias, ys[1])

    m = torch.randn(2, 4, 7, 9)
    conv = packed(nn.Conv2d(4, 6, 3, padding=1), m)
    cut, st = conv._im2col[(m.shape, m.stride())], conv._dispatch.state
    outs = [torch.empty(cut.map_shape), torch.empty(cut.map_shape)]
    assert fastcall.conv(st.addr, m.data_ptr(), cut.geometry_addr, outs[0].data_ptr(), 1, conv.bias.data_ptr()) == 0
    assert native._need().lb_conv(st.addr, m.data_ptr(), cut.geometry, outs[1].data_ptr(), 1, conv.bias.data_ptr()) == 0
    assert torch.equal(outs[0], outs[1])


def test_fast_calls_check_their_arguments() -> None:
    with pytest.raises(TypeError, match="6 arguments"):
        fastcall.linear(1, 2, 3)
    with pytest.raises(TypeError):
        fastcall.conv(0, "x", 0, 0, 1, None)

    class Index:  # converted only if the bad first argument were not caught first
        def __index__(self) -> int:
            return 1

    with pytest.raises(TypeError):  # (not a SystemError from running __index__ with the TypeError pending)
        fastcall.linear("x", 0, Index(), 0, 1, None)
    with pytest.raises(OverflowError):
        fastcall.linear(0, 0, 2**63, 0, 1, None)


def test_dispatch_keeps_the_ctypes_calls_without_the_fast_entry(monkeypatch) -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 128)
    layer = packed(nn.Linear(128, 10), x)
    monkeypatch.setattr(fastcall, "linear", None)
    monkeypatch.setattr(fastcall, "conv", None)
    disp = LayerDispatch(layer._dispatch.route, layer)
    assert disp._lb_linear is native._need().lb_linear and disp._lb_conv is native._need().lb_conv
    assert layer._dispatch._lb_linear is not disp._lb_linear  # (built before the patch: the fast entry)
    decided = {(1, torch.get_num_threads()): True}
    disp.state, disp.decided, layer._dispatch.decided = layer._dispatch.state, decided, decided
    if dispatch.mode() != "auto":
        pytest.skip("decided calls run in auto mode only")
    with torch.no_grad():
        ctypes_out, fast_out = disp.hot(layer, x), layer._dispatch.hot(layer, x)
    assert ctypes_out is not None and fast_out is not None and torch.equal(ctypes_out, fast_out)


def test_a_damaged_cached_entry_is_built_again(tmp_path) -> None:
    """A truncated fast-call library in the cache (a full disk, a copy cut short) is rebuilt once and loaded; it used
    to leave the process on the ctypes calls with "file too short" as the reason."""
    kernels = tmp_path / "kernels"
    kernels.mkdir()
    lib = pathlib.Path(native.build_info()["path"])
    shutil.copy(lib, kernels / lib.name)  # the kernels as cached (no 40 s build), the fast entry built here
    env = dict(os.environ, LOWBIT_CACHE_DIR=str(tmp_path))
    code = "from lowbit.kernels import fastcall as f; print(f.linear is not None, f.seconds > 0, repr(f.reason))"

    def run() -> str:
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    assert run().startswith("True True")  # built on first use
    (entry,) = kernels.glob("lowbit_fastcall-*")
    entry.write_bytes(entry.read_bytes()[:100])
    assert run() == "True True ''"  # the damaged file was built again
    assert run() == "True False ''"  # and is cached again
