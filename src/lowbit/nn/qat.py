"""Layers for quantization-aware training: latent float weights, differentiable weight/activation quantizers.

`QATLinear` / `QATConv2d` keep the float weights as trainable parameters and quantize them (and their inputs) in
every forward with the registered QAT quantizers, so gradients follow each paper's backward rule. After training,
`to_quant_layer` turns a layer whose forward a stored format reproduces exactly (LSQ / STE integers, ternary,
binary with a per-channel or layer scale, int8 per-token or binary per-token activations) into the deployable
`QuantLinear` / `QuantConv2d`.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lowbit.nn.qat import QATLinear
    >>> q = QATLinear.from_float(nn.Linear(16, 4), weight="ternary", act="int8_token")
    >>> y = q(torch.randn(2, 16)); y.sum().backward()
    >>> q.weight.grad.shape
    torch.Size([4, 16])
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.formats.qtensor import QTensor, quantize
from lowbit.formats.registry import ACT_FORMATS
from lowbit.formats.spec import QuantSpec
from lowbit.nn.patches import conv_padding, conv_patches, patch_linear, patches_to_map
from lowbit.nn.qlayers import QuantConv2d, QuantLayer, QuantLinear
from lowbit.quantizers import registry as R


class QATLayer(nn.Module):
    """Shared parts of QAT layers."""

    weight_quant: R.WeightQuantizer | None
    act_quant: R.ActQuantizerQAT | None

    def _setup(
        self, out_channels: int, in_channels: int, weight: str | None, act: str | None, weight_bits: int, act_bits: int
    ) -> None:
        self.weight_name, self.act_name = weight, act
        self.weight_bits_cfg, self.act_bits_cfg = weight_bits, act_bits
        self.weight_quant = None if weight is None else R.make_weight_quantizer(weight, out_channels, bits=weight_bits)
        self.act_quant = None if act is None else R.make_act_quantizer(act, in_channels, bits=act_bits)

    def set_progress(self, p: float) -> None:
        """Training progress in [0, 1] for scheduled quantizers (ReSTE exponent, BiPer stages)."""
        for q in (self.weight_quant, self.act_quant):
            if q is not None:
                q.set_progress(p)

    def quantized_weight(self) -> torch.Tensor:
        return self.weight if self.weight_quant is None else self.weight_quant(self.weight)

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.act_quant is None else self.act_quant(x)

    def lowbit_weight_bits(self) -> float:
        return 32.0 if self.weight_quant is None else float(self.weight_quant.bits)

    def lowbit_act_bits(self) -> float:
        return 32.0 if self.act_quant is None else float(self.act_quant.bits)

    def lowbit_weight_numel(self) -> int:
        return self.weight.numel()

    def lowbit_storage_bits(self) -> int:
        return int(round(self.weight.numel() * self.lowbit_weight_bits())) + self.weight.shape[0] * 16

    # ------------------------------------------------------------------ export
    def export_qtensor(self) -> QTensor | None:
        """The trained weights as a stored format, or None when no format reproduces the forward exactly."""
        w = self.weight.detach().reshape(self.weight.shape[0], -1).float()
        q = self.weight_quant
        if isinstance(q, R.LSQWeight):
            spec = QuantSpec(kind="int", bits=int(q.bits), symmetric=True, granularity="channel")
            step = (q.step.detach().abs() + 1e-8).reshape(-1, 1).half().float()  # stored as fp16
            return quantize(w, spec, params=(step, None))
        if isinstance(q, R.TernaryWeight):
            gran = "channel" if q.method == "tbt" else "tensor"
            return quantize(w, QuantSpec(kind="ternary", bits=2, scale_method=q.method, granularity=gran))
        if isinstance(q, R.SignWeight) and q.scale in ("xnor", "layer", "none"):
            gran = "channel" if q.scale == "xnor" else "tensor"
            method = "none" if q.scale == "none" else "absmean"
            return quantize(w, QuantSpec(kind="binary", bits=1, scale_method=method, granularity=gran))
        if isinstance(q, R.BiPerWeight) and q.progress >= q.stage_split:
            spec = QuantSpec(kind="binary", bits=1, granularity="channel")
            return quantize(torch.sin(q.omega * w), spec, params=(q.alpha.detach().reshape(-1, 1).half().float(), None))
        return None

    def _float_twin(self) -> nn.Module:
        raise NotImplementedError

    def to_quant_layer(self) -> QuantLayer | None:
        """The deployable `QuantLinear` / `QuantConv2d`, or None when no stored format reproduces this layer."""
        qt = self.export_qtensor()
        ok, act = self.export_act_spec()
        if qt is None or not ok:
            return None
        twin = self._float_twin()  # supplies the shape and bias; its weight is replaced by the codes
        with torch.no_grad():
            if self.bias is not None:
                twin.bias.copy_(self.bias)
        layer = (QuantConv2d if isinstance(twin, nn.Conv2d) else QuantLinear).from_float(twin, qt, act)
        if isinstance(self.act_quant, R.BinaryAct):
            layer.set_input_shift(self.act_quant.center)
        return layer

    def export_act_spec(self) -> tuple[bool, QuantSpec | None]:
        """``(exportable, spec)`` for the input quantizer."""
        a = self.act_quant
        if a is None:
            return True, None
        if isinstance(a, R.TokenInt8Act):
            return True, ACT_FORMATS["int8_token"]
        if isinstance(a, R.BinaryAct):  # forward sign(x − c) (BiPer's std division does not change the sign)
            method = "absmean" if a.scale == "token" else "none"
            return True, QuantSpec(kind="binary", bits=1, scale_method=method, granularity="token", dynamic=True)
        return False, None


class QATLinear(QATLayer):
    """``nn.Linear`` with quantized latent weights and inputs during training."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        weight: str | None = "lsq",
        act: str | None = None,
        weight_bits: int = 4,
        act_bits: int = 4,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)
        self._setup(out_features, in_features, weight, act, weight_bits, act_bits)

    @classmethod
    def from_float(cls, mod: nn.Linear, **cfg: Any) -> QATLinear:
        q = cls(mod.in_features, mod.out_features, mod.bias is not None, **cfg)
        with torch.no_grad():
            q.weight.copy_(mod.weight)
            if mod.bias is not None:
                q.bias.copy_(mod.bias)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self._input(x), self.quantized_weight(), self.bias)

    def _float_twin(self) -> nn.Module:
        return nn.Linear(self.in_features, self.out_features, self.bias is not None)


class QATConv2d(QATLayer):
    """``nn.Conv2d`` with quantized latent weights and inputs during training."""

    def __init__(
        self,
        conv: nn.Conv2d,
        weight: str | None = "lsq",
        act: str | None = None,
        weight_bits: int = 4,
        act_bits: int = 4,
    ) -> None:
        super().__init__()
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.padding = conv.kernel_size, conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups
        self.weight = nn.Parameter(conv.weight.detach().clone())
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone())
        self._setup(conv.out_channels, conv.in_channels, weight, act, weight_bits, act_bits)

    @classmethod
    def from_float(cls, mod: nn.Conv2d, **cfg: Any) -> QATConv2d:
        return cls(mod, **cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.act_quant
        if isinstance(a, R.BinaryAct) and tuple(self.dilation) == (1, 1):
            return self._binary_forward(a, x)
        if isinstance(a, (R.TokenInt8Act, R.BinaryAct)):
            # Per-token activations of a convolution are per patch (`lowbit.nn.patches`), as the deployed layer
            # computes them: shift per channel, take the patches (zero padding), then quantize each patch.
            xs = a.shifted(x) if isinstance(a, R.BinaryAct) else x
            u, (oh, ow) = conv_patches(xs, self.kernel_size, self.stride, self.padding, self.dilation)
            uq = a.binarize(u) if isinstance(a, R.BinaryAct) else a(u)
            w = self.quantized_weight()
            return patches_to_map(patch_linear(uq, w.reshape(w.shape[0], -1), self.bias, self.groups), oh, ow)
        return F.conv2d(
            self._input(x), self.quantized_weight(), self.bias, self.stride, self.padding, self.dilation, self.groups
        )

    def _binary_forward(self, a: R.BinaryAct, x: torch.Tensor) -> torch.Tensor:
        """The per-patch binary conv without its patches (as fast as a plain conv, for training): the signs are
        elementwise, the padding reads +1, and an XNOR scale (mean |x| over each patch, no gradient) is one factor
        per output position, XNOR-Net's K: the mean over each kh×kw window of the channel mean of |x|."""
        xs = a.shifted(x)
        token = isinstance(a, R.SignAct) and a.scale == "token"
        signs = a.sign(xs) if token else a.binarize(xs)
        size = (x.shape[2], x.shape[3])
        top, bottom, left, right = conv_padding(size, self.kernel_size, self.dilation, self.padding)
        pads = (left, right, top, bottom)
        y = F.conv2d(F.pad(signs, pads, value=1.0), self.quantized_weight(), None, self.stride, 0, 1, self.groups)
        if token:
            k = F.avg_pool2d(F.pad(xs.detach().abs().mean(1, keepdim=True), pads), self.kernel_size, self.stride)
            y = y * k
        return y if self.bias is None else y + self.bias.view(1, -1, 1, 1)

    def _float_twin(self) -> nn.Module:
        return nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            self.bias is not None,
        )


def to_qat(mod: nn.Module, **cfg: Any) -> QATLayer:
    """The QAT stand-in of a float Linear / Conv2d."""
    if isinstance(mod, nn.Conv2d):
        return QATConv2d.from_float(mod, **cfg)
    return QATLinear.from_float(mod, **cfg)
