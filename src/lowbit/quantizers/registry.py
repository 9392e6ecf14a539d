"""Registered QAT quantizers: a name → a differentiable weight or activation quantizer module.

Weight quantizers map latent float weights to quantized weights (forward) with their paper's backward rule;
activation quantizers do the same for inputs. Both are small ``nn.Module`` s (some hold learnable parameters:
LSQ steps, PACT clips, ReActNet thresholds, BiPer output scales) and expose ``bits`` for BitOPs accounting.

Example:
    >>> import torch
    >>> from lowbit.quantizers.registry import make_weight_quantizer, WEIGHT_QUANTIZERS
    >>> q = make_weight_quantizer("xnor", out_channels=4)
    >>> w = torch.randn(4, 8)
    >>> (q(w).abs().amax(dim=1) - w.abs().mean(dim=1)).abs().max() < 1e-6
    tensor(True)
    >>> "biper" in WEIGHT_QUANTIZERS
    True
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lowbit.errors import RecipeError
from lowbit.formats.spec import suggest
from lowbit.quantizers import binarizers as B
from lowbit.quantizers.lsq import lsq_init_step, lsq_quantize, pact_quantize
from lowbit.quantizers.ste import clipped_round, sign_pm1


class WeightQuantizer(nn.Module):
    """Base: ``forward(w) -> ŵ`` with ``bits`` (effective bits per weight)."""

    bits: float = 32.0
    #: Progress of training in [0, 1] (exponent / stage schedules); set by the trainer.
    progress: float = 0.0

    def set_progress(self, p: float) -> None:
        self.progress = float(p)


class ActQuantizerQAT(nn.Module):
    """Base: ``forward(x) -> x̂`` with ``bits``."""

    bits: float = 32.0
    progress: float = 0.0

    def set_progress(self, p: float) -> None:
        self.progress = float(p)


# ---------------------------------------------------------------------------------------------- weights
class LSQWeight(WeightQuantizer):
    """LSQ with a learnable per-output-channel step (initialised lazily from the first weights seen)."""

    def __init__(self, out_channels: int, bits: int = 4) -> None:
        super().__init__()
        self.bits = float(bits)
        self.step = nn.Parameter(torch.zeros(out_channels))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not bool(self.initialised):
            with torch.no_grad():
                flat = w.detach().reshape(w.shape[0], -1)
                self.step.copy_(torch.stack([lsq_init_step(r, int(self.bits)) for r in flat]))
                self.initialised.fill_(True)
        shape = (-1,) + (1,) * (w.dim() - 1)
        return lsq_quantize(w, self.step.view(shape).abs() + 1e-8, int(self.bits))


class STEWeight(WeightQuantizer):
    """Symmetric per-channel absmax RTN with the clipped STE (no learnable step)."""

    def __init__(self, out_channels: int, bits: int = 4) -> None:
        super().__init__()
        self.bits = float(bits)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        qp = 2 ** (int(self.bits) - 1) - 1
        s = w.detach().reshape(w.shape[0], -1).abs().amax(1).clamp_min(1e-8) / qp
        s = s.view((-1,) + (1,) * (w.dim() - 1))
        return clipped_round(w / s, -qp - 1, qp) * s


class SignWeight(WeightQuantizer):
    """Binary weights ``α·sign(w)``; ``scale``: ``xnor`` (per-channel mean|w|), ``layer`` (ReSTE) or ``none``."""

    bits = 1.0

    def __init__(
        self, out_channels: int, sign: Callable[[torch.Tensor], torch.Tensor] = B.bnn_sign, scale: str = "xnor"
    ) -> None:
        super().__init__()
        self.sign, self.scale = sign, scale

    def alpha(self, w: torch.Tensor) -> torch.Tensor | float:
        if self.scale == "xnor":
            return B.xnor_scale(w)
        if self.scale == "layer":
            return w.detach().abs().mean()
        return 1.0

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return self.alpha(w) * self.sign(w)


class ReSTEWeight(SignWeight):
    """ReSTE: power-function estimator whose exponent follows the cosine schedule to ``o_end``."""

    def __init__(self, out_channels: int, o_end: float = 3.0) -> None:
        super().__init__(out_channels, scale="layer")
        self.o_end = o_end

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        o = B.reste_exponent(self.progress, 1.0, self.o_end)
        return self.alpha(w) * B.reste_sign(w, o)


class BiPerWeight(WeightQuantizer):
    """BiPer: continuous ``sin(ω₀w)`` in stage 1 (progress < ``stage_split``), ``sign(sin(ω₀w))`` after;
    a learnable per-output-channel scale α (initialised to mean|w| so training starts from a sane output scale)."""

    bits = 1.0

    def __init__(self, out_channels: int, omega: float = 20.0, stage_split: float = 0.5) -> None:
        super().__init__()
        self.omega, self.stage_split = omega, stage_split
        self.alpha = nn.Parameter(torch.zeros(out_channels))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not bool(self.initialised):
            with torch.no_grad():
                self.alpha.copy_(B.xnor_scale(w).reshape(-1))
                self.initialised.fill_(True)
        a = self.alpha.view((-1,) + (1,) * (w.dim() - 1))
        if self.progress < self.stage_split:
            return a * B.biper_continuous(w, self.omega)
        return a * B.biper_sign(w, self.omega)


class TernaryWeight(WeightQuantizer):
    """BitNet b1.58 ternary weights with an identity STE: ``absmean`` / ``absmedian`` per tensor, ``tbt`` per row."""

    bits = 1.58

    def __init__(self, out_channels: int, method: str = "absmean") -> None:
        super().__init__()
        self.method = method

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return B.ternary_ste(w, self.method, per_channel=self.method == "tbt")


class TwoPlaneWeight(WeightQuantizer):
    """BinaryDM-style residual binarizer (two binary planes, closed-form per-channel scales)."""

    bits = 2.0

    def __init__(self, out_channels: int) -> None:
        super().__init__()

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return B.two_plane_binarize(w)


# ---------------------------------------------------------------------------------------------- activations
class TokenInt8Act(ActQuantizerQAT):
    """Dynamic per-token absmax int8 (BitNet's activations) with an STE."""

    bits = 8.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.detach().abs().amax(dim=channel_dim(x), keepdim=True).clamp_min(1e-8) / 127
        return clipped_round(x / s, -128, 127) * s


class LSQAct(ActQuantizerQAT):
    """LSQ activations, ``bits`` bits, signed (learnable step, initialised on the first batch)."""

    def __init__(self, bits: int = 4, signed: bool = True) -> None:
        super().__init__()
        self.bits, self.signed = float(bits), signed
        self.step = nn.Parameter(torch.zeros(()))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not bool(self.initialised):
            with torch.no_grad():
                self.step.copy_(lsq_init_step(x, int(self.bits), self.signed))
                self.initialised.fill_(True)
        n = x[0].numel()
        qp = 2 ** (int(self.bits) - 1) - 1 if self.signed else 2 ** int(self.bits) - 1
        return lsq_quantize(
            x, self.step.abs() + 1e-8, int(self.bits), self.signed, grad_scale_factor=1.0 / (n * qp) ** 0.5
        )


class PACTAct(ActQuantizerQAT):
    """PACT: learnable clip α (init 6), unsigned ``bits``-bit activations (use after a ReLU)."""

    def __init__(self, bits: int = 4, init: float = 6.0) -> None:
        super().__init__()
        self.bits = float(bits)
        self.alpha = nn.Parameter(torch.tensor(init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pact_quantize(x, self.alpha.abs() + 1e-4, int(self.bits))


def channel_dim(x: torch.Tensor) -> int:
    """The channel axis of an activation: 1 for ``(N, C, H, W)`` maps, the last axis for tokens / features."""
    return 1 if x.dim() == 4 else x.dim() - 1


def channel_mean(x: torch.Tensor) -> torch.Tensor:
    """Per-channel mean of an activation batch (one value per channel)."""
    d = channel_dim(x)
    return x.detach().float().transpose(d, -1).reshape(-1, x.shape[d]).mean(dim=0)


class BinaryAct(ActQuantizerQAT):
    """Base of the binary activation quantizers: ``sign(x − c)`` with a per-channel threshold ``c``.

    ``c`` starts at each channel's mean over the first training batch: the sign of a ReLU output (or of any
    channel with a non-zero mean) is otherwise almost constant and carries no information (a plain-sign CNN whose
    binarized convs read ReLU outputs falls to chance). ``learn_center=True`` makes ``c`` a trained parameter
    (ReActNet's RSign); otherwise it is a fixed calibrated statistic. Exported layers store ``c`` as their input
    shift, so the deployed layer computes the same ``sign(x − c)``.
    """

    bits = 1.0
    #: ``"token"``: outputs carry the per-token mean |x − c| (XNOR-Net); ``"none"``: plain ±1.
    scale = "none"

    def __init__(self, channels: int, learn_center: bool = False) -> None:
        super().__init__()
        if learn_center:
            self.center = nn.Parameter(torch.zeros(channels))
        else:
            self.register_buffer("center", torch.zeros(channels))
        self.register_buffer("centred", torch.zeros((), dtype=torch.bool))

    def shifted(self, x: torch.Tensor) -> torch.Tensor:
        """``x − c`` (initialising ``c`` from ``x`` on the first call)."""
        if not bool(self.centred):
            with torch.no_grad():
                self.center.copy_(channel_mean(x))
                self.centred.fill_(True)
        shape = [1] * x.dim()
        shape[channel_dim(x)] = -1
        return x - self.center.view(shape).to(x.dtype)

    def binarize(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.binarize(self.shifted(x))


class SignAct(BinaryAct):
    """Binary activations with a given backward rule; ``scale='token'`` multiplies by per-token mean|x| (XNOR)."""

    def __init__(
        self, channels: int, sign: Callable[[torch.Tensor], torch.Tensor] = B.bnn_sign, scale: str = "none"
    ) -> None:
        super().__init__(channels)
        self.sign, self.scale = sign, scale

    def binarize(self, x: torch.Tensor) -> torch.Tensor:
        b = self.sign(x)
        if self.scale == "token":
            b = b * x.detach().abs().mean(dim=channel_dim(x), keepdim=True)
        return b


class ReSTEAct(BinaryAct):
    """ReSTE activations: sign forward, power-function backward with the exponent schedule."""

    def __init__(self, channels: int, o_end: float = 3.0) -> None:
        super().__init__(channels)
        self.o_end = o_end

    def binarize(self, x: torch.Tensor) -> torch.Tensor:
        return B.reste_sign(x, B.reste_exponent(self.progress, 1.0, self.o_end))


class RSignAct(BinaryAct):
    """ReActNet RSign: ``sign(x − β_c)`` with a learnable per-channel threshold β (ApproxSign backward)."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels, learn_center=True)

    def binarize(self, x: torch.Tensor) -> torch.Tensor:
        return B.approx_sign(x)


class BiPerAct(BinaryAct):
    """BiPer's activations: divided by their per-sample std, then sign with the ``(2 − 2|x|)_+`` backward."""

    def binarize(self, x: torch.Tensor) -> torch.Tensor:
        dims = tuple(range(1, x.dim()))
        x = x / torch.sqrt(x.var(dim=dims, keepdim=True, unbiased=False) + 1e-5)
        return B.triangle_sign(x)


WEIGHT_QUANTIZERS: dict[str, Callable[..., WeightQuantizer]] = {
    "lsq": lambda c, bits=4, **k: LSQWeight(c, bits),
    "ste": lambda c, bits=4, **k: STEWeight(c, bits),
    "bnn": lambda c, **k: SignWeight(c, B.bnn_sign, "none"),
    "xnor": lambda c, **k: SignWeight(c, B.bnn_sign, "xnor"),
    "bireal": lambda c, **k: SignWeight(c, B.bnn_sign, "xnor"),
    "reste": lambda c, **k: ReSTEWeight(c),
    "biper": lambda c, **k: BiPerWeight(c),
    "ternary": lambda c, **k: TernaryWeight(c, "absmean"),
    "ternary_absmedian": lambda c, **k: TernaryWeight(c, "absmedian"),
    "ternary_tbt": lambda c, **k: TernaryWeight(c, "tbt"),
    "two_plane": lambda c, **k: TwoPlaneWeight(c),
}

ACT_QUANTIZERS: dict[str, Callable[..., ActQuantizerQAT]] = {
    "int8_token": lambda c, **k: TokenInt8Act(),
    "lsq": lambda c, bits=4, **k: LSQAct(bits),
    "pact": lambda c, bits=4, **k: PACTAct(bits),
    "bnn": lambda c, **k: SignAct(c, B.bnn_sign),
    "xnor": lambda c, **k: SignAct(c, B.bnn_sign, "token"),
    "bireal": lambda c, **k: SignAct(c, B.approx_sign),
    "reste": lambda c, **k: ReSTEAct(c),
    "react": lambda c, **k: RSignAct(c),
    "biper": lambda c, **k: BiPerAct(c),
}


def make_weight_quantizer(name: str, out_channels: int, **kwargs: object) -> WeightQuantizer:
    if name not in WEIGHT_QUANTIZERS:
        raise RecipeError(
            f"unknown weight quantizer '{name}'{suggest(name, list(WEIGHT_QUANTIZERS))}; "
            f"available: {', '.join(WEIGHT_QUANTIZERS)}"
        )
    return WEIGHT_QUANTIZERS[name](out_channels, **kwargs)


def make_act_quantizer(name: str, in_channels: int, **kwargs: object) -> ActQuantizerQAT:
    if name not in ACT_QUANTIZERS:
        raise RecipeError(
            f"unknown activation quantizer '{name}'{suggest(name, list(ACT_QUANTIZERS))}; "
            f"available: {', '.join(ACT_QUANTIZERS)}"
        )
    return ACT_QUANTIZERS[name](in_channels, **kwargs)


__all__ = ["ACT_QUANTIZERS", "WEIGHT_QUANTIZERS", "make_act_quantizer", "make_weight_quantizer", "sign_pm1"]
