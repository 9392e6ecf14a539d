"""Simulated quantized stand-ins for ``nn.Linear`` and ``nn.Conv2d``.

A `QuantLinear` / `QuantConv2d` stores what a deployed layer stores — integer codes, fp16-representable scales
(and zero points), the bias — plus an optional `ActQuantizer` for its input. Its forward dequantizes the codes
(cached) and runs the float op, so its output is exactly what the format computes; packed kernels must match it.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lowbit.formats import FORMATS
    >>> from lowbit.methods.rtn import rtn_quantize
    >>> from lowbit.nn.qlayers import QuantLinear
    >>> lin = nn.Linear(64, 8)
    >>> q = QuantLinear.from_float(lin, rtn_quantize(lin.weight, FORMATS["int8"]))
    >>> x = torch.randn(3, 64)
    >>> bool((q(x) - lin(x)).abs().max() < 0.05), q.lowbit_weight_bits()
    (True, 8.0)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.errors import ModelError
from lowbit.formats.layout import num_units
from lowbit.formats.qtensor import QTensor, code_dtype, dequantize, storage_bits
from lowbit.formats.spec import QuantSpec
from lowbit.nn.act import ActQuantizer
from lowbit.nn.patches import conv_patches, patch_linear, patches_to_map


class QuantLayer(nn.Module):
    """Shared storage and bookkeeping of quantized layers (codes, scale, zero, bias, input quantizer)."""

    def _init_storage(
        self,
        rows: int,
        cols: int,
        weight_spec: QuantSpec | None,
        act_spec: QuantSpec | None,
        bias: bool,
        calibrator: str = "percentile",
        percentile: float = 99.99,
    ) -> None:
        self.weight_spec = weight_spec
        self.act_spec = act_spec
        self._matrix_shape = (rows, cols)
        if weight_spec is not None:
            units = num_units((rows, cols), weight_spec.granularity, weight_spec.group_size)
            self.register_buffer("codes", torch.zeros(rows, cols, dtype=code_dtype(weight_spec)))
            self.register_buffer("scale", torch.ones(units))
            if weight_spec.has_zero_point:
                self.register_buffer("zero", torch.zeros(units))
            else:
                self.zero = None
            self.weight_fp = None
        else:
            self.weight_fp = nn.Parameter(torch.zeros(rows, cols))
        self.bias = nn.Parameter(torch.zeros(rows)) if bias else None
        self.act = ActQuantizer(act_spec, calibrator, percentile) if act_spec is not None else None
        self._cache: torch.Tensor | None = None
        self.input_scale: torch.Tensor | None = None
        self.input_shift: torch.Tensor | None = None

    # ------------------------------------------------------------------ weights
    def set_qweight(self, qt: QTensor) -> None:
        """Install quantized codes and scales (shapes must match the layer)."""
        if self.weight_spec is None:
            raise ModelError("this layer keeps float weights; it has no quantized codes to set")
        if tuple(qt.codes.shape) != self._matrix_shape or tuple(qt.scale.shape) != tuple(self.scale.shape):
            raise ModelError(
                f"quantized weight of shape {tuple(qt.codes.shape)} / scales {tuple(qt.scale.shape)} "
                f"do not fit a layer of {self._matrix_shape} / {tuple(self.scale.shape)}"
            )
        self._store_codes(qt.codes)
        self.scale.copy_(qt.scale)
        if self.zero is not None and qt.zero is not None:
            self.zero.copy_(qt.zero)
        self._cache = None

    def _store_codes(self, codes: torch.Tensor) -> None:
        self.codes.copy_(codes)

    def qweight(self) -> QTensor:
        """The stored weight as a `QTensor` (codes, scale, zero, spec)."""
        if self.weight_spec is None:
            raise ModelError("this layer keeps float weights")
        return QTensor(self.codes, self.scale, self.zero, self.weight_spec)

    def weight_matrix(self) -> torch.Tensor:
        """Dequantized weight as a 2-D ``(out, in·kh·kw)`` matrix (cached until the codes change)."""
        if self.weight_fp is not None:
            return self.weight_fp
        if self._cache is None or self._cache.device != self.scale.device:
            self._cache = dequantize(self.qweight())
        return self._cache

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._cache = None
        super()._load_from_state_dict(*args, **kwargs)

    def set_input_scale(self, scale: torch.Tensor) -> None:
        """Multiply every input by ``scale`` (one value per input feature / channel) before quantizing it.

        Used by AWQ and SmoothQuant when no preceding op can absorb their per-channel scale: the weights hold
        ``W·diag(1/scale)`` and the layer computes ``(x·scale)`` first, so the float function is unchanged.
        """
        self._set_input_vector("input_scale", scale)

    def set_input_shift(self, shift: torch.Tensor) -> None:
        """Subtract ``shift`` (one value per input feature / channel) from every input before quantizing it.

        Binary activations are ``sign(x − shift)``: a per-channel threshold (ReActNet's RSign, or the calibrated
        channel mean) without which the sign of a ReLU output would be constant.
        """
        self._set_input_vector("input_shift", shift)

    def _set_input_vector(self, name: str, value: torch.Tensor) -> None:
        # A copy the layer owns: a vector shared with another layer (or the caller) would be written through it.
        value = value.detach().float().reshape(-1).clone()
        if name in self._buffers:
            self._buffers[name] = value.to(self._buffers[name].device)
        else:
            self.__dict__.pop(name, None)  # the plain None attribute set in __init__
            self.register_buffer(name, value)
        if "_dispatch" in self.__dict__:
            self._dispatch = False  # a packed layer's kernel route depends on it: derive it again

    def _per_channel(self, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return v.view(1, -1, 1, 1) if x.dim() == 4 and self._channels_first else v

    def _scale_shift_input(self, x: torch.Tensor) -> torch.Tensor:
        """The input after the layer's explicit input scale and shift (before activation quantization)."""
        if self.input_scale is not None:
            x = x * self._per_channel(self.input_scale, x)
        if self.input_shift is not None:
            x = x - self._per_channel(self.input_shift, x)
        return x

    def _quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        x = self._scale_shift_input(x)
        return self.act(x) if self.act is not None else x

    # ------------------------------------------------------------------ lowbit measurement protocol
    def lowbit_weight_bits(self) -> float:
        return 32.0 if self.weight_spec is None else self.weight_spec.effective_code_bits

    def lowbit_act_bits(self) -> float:
        return 32.0 if self.act is None else self.act.bits()

    def lowbit_weight_numel(self) -> int:
        return self._matrix_shape[0] * self._matrix_shape[1]

    def lowbit_storage_bits(self) -> int:
        extra = sum(v.numel() * 16 for v in (self.input_scale, self.input_shift) if v is not None)
        if self.weight_spec is None:
            return self.lowbit_weight_numel() * 32 + extra
        return storage_bits(self.lowbit_weight_numel(), self.scale, self.zero, self.weight_spec) + extra

    def layer_spec(self) -> dict[str, Any]:
        """JSON-able description used by `lowbit.save` to rebuild this layer."""
        return {
            "weights": None if self.weight_spec is None else self.weight_spec.to_dict(),
            "activations": None if self.act_spec is None else self.act_spec.to_dict(),
            "calibrator": self.act.calibrator if self.act is not None else None,
            "percentile": self.act.percentile if self.act is not None else None,
            "input_scale": None if self.input_scale is None else int(self.input_scale.numel()),
            "input_shift": None if self.input_shift is None else int(self.input_shift.numel()),
        }


class QuantLinear(QuantLayer):
    """Quantized ``nn.Linear``: ``y = x̂ Ŵᵀ + b``."""

    _channels_first = False

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        weight_spec: QuantSpec | None = None,
        act_spec: QuantSpec | None = None,
        calibrator: str = "percentile",
        percentile: float = 99.99,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_storage(out_features, in_features, weight_spec, act_spec, bias, calibrator, percentile)

    @classmethod
    def from_float(
        cls, mod: nn.Linear, qt: QTensor | None, act_spec: QuantSpec | None = None, **act_options: Any
    ) -> QuantLinear:
        q = cls(
            mod.in_features,
            mod.out_features,
            mod.bias is not None,
            None if qt is None else qt.spec,
            act_spec,
            **act_options,
        )
        _copy_common(q, mod, qt)
        return q

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_matrix()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self._quantize_input(x), self.weight_matrix(), self.bias)

    def extra_repr(self) -> str:
        w = "fp32" if self.weight_spec is None else self.weight_spec.label()
        return f"in={self.in_features}, out={self.out_features}, weights={w}"


class QuantConv2d(QuantLayer):
    """Quantized ``nn.Conv2d`` (grouped and depthwise included); weights flattened to ``(out, in/groups·kh·kw)``."""

    _channels_first = True

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: tuple[int, int],
        stride: tuple[int, int] = (1, 1),
        padding: tuple[int, int] | str = (0, 0),
        dilation: tuple[int, int] = (1, 1),
        groups: int = 1,
        bias: bool = True,
        weight_spec: QuantSpec | None = None,
        act_spec: QuantSpec | None = None,
        calibrator: str = "percentile",
        percentile: float = 99.99,
    ) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = tuple(kernel_size), tuple(stride), padding
        self.dilation, self.groups = tuple(dilation), groups
        cols = in_channels // groups * self.kernel_size[0] * self.kernel_size[1]
        self._init_storage(out_channels, cols, weight_spec, act_spec, bias, calibrator, percentile)

    @classmethod
    def from_float(
        cls, mod: nn.Conv2d, qt: QTensor | None, act_spec: QuantSpec | None = None, **act_options: Any
    ) -> QuantConv2d:
        if mod.padding_mode != "zeros":
            raise ModelError(f"Conv2d with padding_mode='{mod.padding_mode}' is not supported: only 'zeros'")
        q = cls(
            mod.in_channels,
            mod.out_channels,
            mod.kernel_size,
            mod.stride,
            mod.padding,
            mod.dilation,
            mod.groups,
            mod.bias is not None,
            None if qt is None else qt.spec,
            act_spec,
            **act_options,
        )
        _copy_common(q, mod, qt)
        return q

    @property
    def weight(self) -> torch.Tensor:
        kh, kw = self.kernel_size
        return self.weight_matrix().reshape(self.out_channels, self.in_channels // self.groups, kh, kw)

    @property
    def patch_tokens(self) -> bool:
        """True when the input is quantized per token, which for a convolution means per patch (one scale per
        output position, see `lowbit.nn.patches`): the layer then runs as patches × weight matrix."""
        act = self.act
        return act is not None and act.spec.dynamic and act.spec.granularity == "token"

    @property
    def patch_kernel(self) -> bool:
        """True when a packed copy of the layer can run as patches × weight matrix with the simulated layer's codes:
        per-patch activations, no activation quantizer (weight-only: fp32 patches, the conv's products summed in
        another order), or a static per-tensor int8 range with an integer zero point (the same code per patch as
        per map; a padded 0 codes the zero point exactly, as in the padded quantized map)."""
        act = self.act
        if self.patch_tokens or act is None:
            return True
        if act is None or act.spec.dynamic or act.spec.kind != "int" or act.spec.bits != 8:
            return False
        return act.zero is None or bool(act.zero == act.zero.round())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.patch_tokens:
            u, (oh, ow) = conv_patches(
                self._scale_shift_input(x), self.kernel_size, self.stride, self.padding, self.dilation
            )
            y = patch_linear(self.act(u), self.weight_matrix(), self.bias, self.groups)
            return patches_to_map(y, oh, ow)
        return F.conv2d(
            self._quantize_input(x), self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups
        )

    def conv_args(self) -> dict[str, Any]:
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "kernel_size": list(self.kernel_size),
            "stride": list(self.stride),
            "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
            "dilation": list(self.dilation),
            "groups": self.groups,
        }

    def extra_repr(self) -> str:
        w = "fp32" if self.weight_spec is None else self.weight_spec.label()
        k = self.kernel_size
        return f"{self.in_channels}, {self.out_channels}, kernel_size={k}, groups={self.groups}, weights={w}"


def _copy_common(q: QuantLayer, mod: nn.Module, qt: QTensor | None) -> None:
    with torch.no_grad():
        if qt is not None:
            q.set_qweight(qt)
        else:
            q.weight_fp.copy_(mod.weight.detach().reshape(mod.weight.shape[0], -1))
        if mod.bias is not None:
            q.bias.copy_(mod.bias.detach())
    q.to(mod.weight.device)


def is_quant_layer(m: nn.Module) -> bool:
    return isinstance(m, QuantLayer)
