"""Which native kernel computes a packed layer, and how its weights and inputs are handed over.

A `Route` binds one packed layer to one kernel of `lowbit.kernels.native`: ``prepare`` turns the layer's codes,
scales and zero points into the kernel's streaming layout (once), ``run`` takes the layer's input after its input
scale / shift (a 2-D float matrix) and returns the output without bias. Activations are quantized here with the
same functions as the simulated `ActQuantizer` (`fit_params` / `encode` at run time), so an integer kernel sees
exactly the codes and scales the simulated layer uses and the results agree up to float rounding of the final
rescale.

| weights | activations | kernel |
|---|---|---|
| int8 per channel | float / int8 per token | ``w8a32`` / ``w8a8`` |
| int2 / int3 / int4, groups of 32, 64 or 128 | float / int8 per token | ``wNa32`` / ``wNa8`` |
| ternary | int8 per token / float | ``ternary`` / ``w2a32`` (codes + 1 as 2-bit, zero 1) |
| binary | binary per token / int8 per token / float | ``w1a1`` (XNOR-popcount) / ``w1a8`` / ``w1a32`` |

Everything else (fp8, fp4, int6, convolutions, static activations) has no route: the layer runs its dense
reference path. A weight-only int or binary layer whose ``kernel_activations`` is ``"int8"`` (`lowbit.pack(...,
kernel_activations="int8")`) takes the ``…a8`` kernel, quantizing its input per token to int8 inside the kernel as
ONNX Runtime's ``accuracy_level=4`` does: faster on CPUs, at the cost of that rounding (not in the simulated model).

Example:
    >>> import torch
    >>> from torch import nn
    >>> import lowbit
    >>> from lowbit.kernels.routes import route_for
    >>> q = lowbit.pack(lowbit.compress(nn.Sequential(nn.Linear(256, 64)), "w1a1", progress=False))
    >>> route_for(q[0]).kernel
    'w1a1'
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lowbit.formats import integer
from lowbit.formats.layout import to_units
from lowbit.formats.qtensor import encode, fit_params
from lowbit.formats.registry import ACT_FORMATS
from lowbit.formats.scales import MAX_SCALE, MIN_SCALE, runtime_scale
from lowbit.formats.spec import QuantSpec

GROUPS = (32, 64, 128)


@dataclass(frozen=True)
class Route:
    """One packed layer's native kernel: ``prepare(layer) → state`` once, then ``run(x2d, state, threads) → y``."""

    kernel: str
    prepare: Callable[[Any], Any]
    run: Callable[[torch.Tensor, Any, int], torch.Tensor]


def int8_rows(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token int8 codes and fp32 scales of ``x`` (M, K), exactly as the simulated activation quantizer (one C
    pass when the native library is loaded, lowbit's torch functions otherwise)."""
    from lowbit.kernels import native

    if native.available():
        _, qmax = integer.qrange(spec.bits, True)
        return native.quantize_rows_symmetric(x, float(qmax), MIN_SCALE, MAX_SCALE)
    u = to_units(x.float(), "token", None)
    s, z = fit_params(u, spec, store=False)
    return encode(u, s, z, spec).reshape(x.shape).to(torch.int8).contiguous(), s.reshape(-1).contiguous()


def sign_rows(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token signs (zero → +1; packed words when the native library is loaded, else a bool tensor) and the
    fp32 scales of ``x`` (M, K) for binary activations, as the simulated activation quantizer computes them (the
    native mean |x| is accumulated in double and may differ from torch's in the last bit)."""
    from lowbit.kernels import native

    absmean = spec.scale_method != "none"
    if native.available():
        signs, scale = native.sign_rows(x, MIN_SCALE if absmean else None, MAX_SCALE)
    else:
        signs, scale = (x >= 0).contiguous(), runtime_scale(x.abs().mean(dim=-1)) if absmean else None
    return signs, (torch.ones(x.shape[0]) if scale is None else scale.contiguous())


def _is_int8_token(spec: QuantSpec | None) -> bool:
    return spec is not None and spec.kind == "int" and spec.bits == 8 and spec.symmetric and spec.dynamic


def _is_binary_token(spec: QuantSpec | None) -> bool:
    return spec is not None and spec.kind == "binary" and spec.dynamic


def _kernel_group(spec: QuantSpec, k: int) -> int | None:
    """The kernel group size of a group-wise format on rows of length ``k`` (one short group when k < size)."""
    if spec.granularity != "group" or spec.group_size is None:
        return None
    g = spec.group_size if k % spec.group_size == 0 else k if k < spec.group_size else None
    return g if g in GROUPS else None


def route_for(layer: nn.Module) -> Route | None:
    """The native route of a packed linear layer, or None when its format has no fast kernel."""
    from lowbit.kernels import native
    from lowbit.nn.packed import PackedLinear

    if not isinstance(layer, PackedLinear):
        return None
    w: QuantSpec = layer.weight_spec
    act: QuantSpec | None = layer.act_spec
    if act is None and getattr(layer, "kernel_activations", "exact") == "int8" and w.kind in ("int", "binary"):
        act = ACT_FORMATS["int8_token"]  # opt-in: weight-only layers take int8 inputs inside the kernel
    if act is not None and not (_is_int8_token(act) or _is_binary_token(act)):
        return None
    n, k = layer._matrix_shape
    zero = layer.zero

    if w.kind == "int" and w.bits == 8 and w.symmetric and w.granularity == "channel" and not _is_binary_token(act):

        def prep_w8(lay: Any) -> Any:
            return native.prepare_w8(lay.codes.to(torch.int8), lay.scale.reshape(n).float())

        if act is None:
            return Route("w8a32", prep_w8, lambda x, p, t: native.matmul_w8a32(x, p, t))
        return Route("w8a8", prep_w8, lambda x, p, t: native.matmul_w8a8(*int8_rows(x, act), p, t))

    group = _kernel_group(w, k)
    if (
        w.kind == "int"
        and w.bits in (2, 3, 4)
        and not w.symmetric
        and group is not None
        and not _is_binary_token(act)
        and bool(torch.equal(zero, zero.round()))
    ):

        def prep_wn(lay: Any) -> Any:
            return native.prepare_wn(lay.codes.to(torch.uint8), lay.scale.float(), lay.zero.float(), w.bits, group)

        if act is None:
            return Route(f"w{w.bits}a32", prep_wn, lambda x, p, t: native.matmul_wna32(x, p, t))
        return Route(f"w{w.bits}a8", prep_wn, lambda x, p, t: native.matmul_wna8(*int8_rows(x, act), p, t))

    if w.kind == "ternary" and not _is_binary_token(act):
        if act is not None:
            return Route(
                "ternary",
                lambda lay: native.prepare_ternary(lay.codes.to(torch.int8), lay.scale.reshape(-1).float()),
                lambda x, p, t: native.matmul_ternary(*int8_rows(x, act), p, t),
            )
        group = next((g for g in reversed(GROUPS) if k % g == 0), None)
        if group is None:
            return None

        def prep_t2(lay: Any) -> Any:
            s = lay.scale.reshape(-1).float().expand(n).reshape(n, 1).expand(n, k // group).contiguous()
            return native.prepare_wn((lay.codes + 1).to(torch.uint8), s, torch.ones_like(s), 2, group)

        return Route("w2a32", prep_t2, lambda x, p, t: native.matmul_wna32(x, p, t))

    if w.kind == "binary":

        def prep_b(layouts: tuple[str, ...]) -> Callable[[Any], Any]:
            return lambda lay: native.prepare_binary(
                lay.codes > 0, lay.scale.reshape(-1).float().expand(n).contiguous(), layouts=layouts
            )

        if _is_binary_token(act):
            return Route(
                "w1a1",
                prep_b(("a1",)),
                lambda x, p, t: native.matmul_w1a1(*sign_rows(x, act), p, t),
            )
        if act is not None:
            return Route(
                "w1a8",
                prep_b(("a8",)),
                lambda x, p, t: native.matmul_w1a8(*int8_rows(x, act), p, t),
            )
        return Route(
            "w1a32",
            prep_b(("a32",)),
            lambda x, p, t: native.matmul_w1a32(x, p, t),
        )
    return None
