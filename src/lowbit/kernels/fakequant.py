"""Dynamic per-token activation fake quantization in one C pass, bit-identical to the PyTorch path.

`ActQuantizer` (the simulated activation quantizer of every quantized layer) calls `fake_quantize_fast` first;
it returns None where the C pass does not apply — no native library, ``LOWBIT_KERNELS=reference``, a model being
traced or compiled (``torch.jit.trace``, ``torch.compile``: they cannot see a foreign call), a tensor that
is not fp32 on the CPU, or a spec other than dynamic per-token symmetric integer or low-bit float (FP8 / FP6 /
FP4) — and the caller falls back to `lowbit.formats.qtensor.fake_quantize`. Either way the values are the same
(tested bit for bit), so a packed model and its simulated original agree whichever path runs; the C pass only
removes the 5–15 tensor operations of the PyTorch path (the FP8 path also a ``searchsorted`` code lookup).

Example:
    >>> import torch
    >>> from lowbit.formats import ACT_FORMATS
    >>> from lowbit.formats.qtensor import fake_quantize
    >>> from lowbit.kernels.fakequant import fake_quantize_fast
    >>> x = torch.randn(4, 64)
    >>> y = fake_quantize_fast(x, ACT_FORMATS["fp8_token"])
    >>> y is None or torch.equal(y, fake_quantize(x, ACT_FORMATS["fp8_token"]))
    True
"""

from __future__ import annotations

from functools import cache
from typing import Any

import torch

from lowbit.formats import integer, lowfloat
from lowbit.formats.scales import MAX_SCALE, MIN_SCALE
from lowbit.formats.spec import QuantSpec


@cache
def _plan(spec: QuantSpec) -> tuple[str, tuple] | None:
    """Which C pass computes ``spec`` and its constants, or None."""
    if not spec.dynamic or spec.granularity != "token":
        return None
    if spec.kind == "int" and spec.symmetric:
        return "int", (float(integer.qrange(spec.bits, True)[1]), MIN_SCALE, MAX_SCALE)
    if spec.kind == "fp" and spec.fp_format is not None:
        lay = lowfloat.layout(str(spec.fp_format))
        return "fp", (lay.man_bits, lay.emin, lay.emax, lay.max_value, MIN_SCALE, MAX_SCALE)
    return None


def has_fast_path(spec: QuantSpec | None) -> bool:
    """Whether `fake_quantize_fast` computes ``spec`` (dynamic per-token symmetric int or low-bit float)."""
    return spec is not None and _plan(spec) is not None


_modules: tuple[Any, Any] | None = None  # (dispatch, native), imported at first use (dispatch imports this module)


def _enabled() -> bool:
    global _modules
    if _modules is None:
        from lowbit.kernels import dispatch, native

        _modules = (dispatch, native)
    dispatch, native = _modules
    return native.available() and dispatch.mode() != "reference"


def fake_quantize_fast(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor | None:
    """``fake_quantize(x, spec)`` computed in C for a dynamic per-token spec, or None where that does not apply.

    ``x`` of any rank is viewed as rows of its last dimension, as the PyTorch path does. Gradients are not
    tracked: callers use it only where autograd is off or ``x`` needs no gradient.
    """
    if torch._C._get_tracing_state() is not None or torch.compiler.is_compiling():
        return None  # traced / compiled: the PyTorch path, which the graph can record (a C call it cannot)
    plan = _plan(spec)
    if plan is None or not _enabled():
        return None
    if x.dtype is not torch.float32 or not x.is_cpu or x.dim() == 0 or x.numel() == 0:
        return None
    kind, constants = plan
    # Straight to the C entry: reshape / _as checks each cost microseconds per call here.
    if not x.is_contiguous():
        x = x.contiguous()
    out = torch.empty_like(x)  # fp32 and contiguous as x (0.9 µs here; torch.empty(x.shape) 2.1)
    k = x.shape[-1]
    lib = _modules[1]._need()  # type: ignore[index]  # loaded: _enabled() checked it
    fn = lib.lb_fake_quant_rows_i8 if kind == "int" else lib.lb_fake_quant_rows_fp
    fn(x.data_ptr(), x.numel() // k, k, *constants, out.data_ptr())
    return out
