"""`ActQuantizer`: fake-quantizes a layer's input activations, dynamically or with a calibrated static range.

Dynamic specs (``dynamic=True``, per token or per tensor) compute the scale from every input at run time. Static
specs hold a per-tensor ``scale`` / ``zero`` buffer set by calibration (`lowbit.calibration.calibrate`); until then
the quantizer refuses to run, so an uncalibrated model can never silently pass float activations.

Example:
    >>> import torch
    >>> from lowbit.formats import ACT_FORMATS
    >>> from lowbit.nn.act import ActQuantizer
    >>> q = ActQuantizer(ACT_FORMATS["int8_token"])
    >>> x = torch.randn(2, 3, 16)
    >>> bool((q(x) - x).abs().max() < 0.05)
    True
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn

from lowbit.errors import ModelError
from lowbit.formats.qtensor import decode, encode, fake_quantize
from lowbit.formats.spec import QuantSpec
from lowbit.kernels.fakequant import fake_quantize_fast

#: Static quantizer → the fp32 ``[scale, zero]`` copies native kernels hold of its range (`kernels.routes`): kept in
#: step by `ActQuantizer.set_range` and state-dict loads, so a prepared kernel follows a recalibration without
#: pointing into the quantizer's buffers (which ``share_memory()`` or ``load_state_dict(assign=True)`` can move).
_KERNEL_RANGES: weakref.WeakKeyDictionary[nn.Module, weakref.WeakSet[torch.Tensor]] = weakref.WeakKeyDictionary()


class ActQuantizer(nn.Module):
    """Quantize-dequantize activations to ``spec`` (simulated quantization)."""

    def __init__(self, spec: QuantSpec, calibrator: str = "percentile", percentile: float = 99.99) -> None:
        super().__init__()
        if not spec.dynamic and spec.granularity != "tensor":
            raise ModelError(
                f"static activation quantization supports granularity 'tensor' only, got "
                f"'{spec.granularity}': use dynamic=True for per-token scales"
            )
        if not spec.dynamic and spec.kind in ("binary", "ternary"):
            raise ModelError(f"{spec.kind} activations must be dynamic (their scale is computed per token)")
        self.spec = spec
        self.calibrator = calibrator
        self.percentile = percentile
        self.observing = False  # set by calibration: pass float activations through while hooks observe them
        if not spec.dynamic:
            self.register_buffer("scale", torch.full((), float("nan")))
            if spec.kind == "int" and not spec.symmetric:
                self.register_buffer("zero", torch.zeros(()))
            else:
                self.zero = None

    @property
    def calibrated(self) -> bool:
        return self.spec.dynamic or bool(torch.isfinite(self.scale))

    def set_range(self, scale: torch.Tensor, zero: torch.Tensor | None) -> None:
        """Install a calibrated static scale (and zero point: an integer code of the format's range, as ONNX's
        QuantizeLinear takes, so a padded 0 stays exactly 0)."""
        if zero is not None:
            self._check_zero(zero)
        self.scale.copy_(scale)
        if zero is not None:
            self.zero.copy_(zero)
        self._sync_kernel_ranges()

    def kernel_range(self) -> torch.Tensor:
        """A new fp32 ``[scale, zero]`` copy of the static range for a native kernel, kept in step with this
        quantizer's range from now on (`set_range`, state-dict loads) for as long as the copy lives."""
        rng = torch.zeros(2, dtype=torch.float32)
        _KERNEL_RANGES.setdefault(self, weakref.WeakSet()).add(rng)  # (dropped with the kernel that holds it)
        self._sync_kernel_ranges()
        return rng

    def _sync_kernel_ranges(self) -> None:
        copies = _KERNEL_RANGES.get(self)
        if copies:
            z = 0.0 if self.zero is None else float(self.zero)
            for rng in copies:
                rng[0], rng[1] = float(self.scale), z

    def _check_zero(self, zero: torch.Tensor) -> None:
        if self.spec.kind != "int":
            return
        from lowbit.formats.integer import qrange

        lo, hi = qrange(self.spec.bits, self.spec.symmetric)
        z = torch.as_tensor(zero, dtype=torch.float64)
        if not bool(torch.all((z == z.round()) & (z >= lo) & (z <= hi))):
            raise ModelError(f"a static zero point must be an integer in [{lo}, {hi}], got {z.tolist()}")

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        if getattr(self, "zero", None) is not None and prefix + "zero" in state_dict:
            self._check_zero(state_dict[prefix + "zero"])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._sync_kernel_ranges()

    def bits(self) -> float:
        return self.spec.effective_code_bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            return x
        if self.spec.dynamic:
            if not (x.requires_grad and torch.is_grad_enabled()):
                fast = fake_quantize_fast(x, self.spec)  # the same values in one C pass, where it applies
                if fast is not None:
                    return fast
            return fake_quantize(x, self.spec)
        if not self.calibrated:
            raise ModelError(
                "static activation quantizer used before calibration: pass calibration data to "
                "lowbit.compress (or use a dynamic activation format)"
            )
        return decode(encode(x.float(), self.scale, self.zero, self.spec), self.scale, self.zero, self.spec).to(x.dtype)

    def extra_repr(self) -> str:
        return self.spec.label()
