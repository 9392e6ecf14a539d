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

import torch
from torch import nn

from lowbit.errors import ModelError
from lowbit.formats.qtensor import decode, encode, fake_quantize
from lowbit.formats.spec import QuantSpec
from lowbit.kernels.fakequant import fake_quantize_fast


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
        """Install a calibrated static scale (and zero point)."""
        self.scale.copy_(scale)
        if zero is not None:
            self.zero.copy_(zero)

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
