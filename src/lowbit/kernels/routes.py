"""Which native kernel computes a packed layer, and how its weights and inputs are handed over.

A `Route` binds one packed layer to one kernel of `lowbit.kernels.native`: ``prepare`` turns the layer's codes,
scales and zero points into the kernel's streaming layout and describes its activation quantizer (once, a
`layer.NativeLinear`); `layer.linear` then runs the layer on its input after the input scale / shift (a 2-D
float matrix) in one C call: activation quantization (the same expressions as the simulated `ActQuantizer`, so
an integer kernel sees exactly the codes and scales the simulated layer uses), kernel and bias. Results agree
with the simulated layer up to float rounding of the final rescale.

| weights | activations | kernel |
|---|---|---|
| int8 per channel | float / int8 per token | ``w8a32`` / ``w8a8`` |
| int2 / int3 / int4, groups of 32 / 64 / 128, integer or real zeros | float / int8 per token | ``wNa32`` / ``wNa8`` |
| ternary | int8 per token / float | ``ternary`` / ``w2a32`` (codes + 1 as 2-bit, zero 1) |
| binary | binary per token / int8 per token / float | ``w1a1`` (XNOR-popcount) / ``w1a8`` / ``w1a32`` |

Float activations on 8+ rows run the layer's int8 panels (`kernels.panels`) dequantized into an fp32 register-tile
GEMM (`panels.matmul_f32_panel`), every weight-only format alike (`f32_panel_rows`).

FP4 (E2M1, group scales) runs its 4-bit codes in the int4 row kernel, read through a table of twice their values
(integers up to ±12) with halved scales, and group panels of those values on many rows, with float inputs only
(``fp4a32``). FP8 (E4M3 / E5M2, per channel) runs panels of its bytes, decoded in the fp32 panel kernel,
with float inputs or dynamic per-token low-bit float ones fake-quantized in the same call (``fp8a32`` / ``fp8a8``).
Static per-tensor int8 activations (calibrated scale and zero point: ``w8a8-static``) take the ``…a8`` kernel of
their weights (``w8a8-static``, ``w4a8-static``, ``ternary-static``, ...): ``lb_linear`` makes the codes
``clamp(rint(x / s + z), 0, 255)`` from a copy of the quantizer's range (kept in step by ``set_range``), shifted by
−128 to signed bytes, and adds back ``s · (128 − z) · Σₖ W[n, k]`` per output (`layer.with_static_activations`).
A weight-only convolution (``groups=1``) takes its weights' fp32-input kernel on its patches (``lb_conv``: patches,
kernel and output map in one C call), raced against the conv on the cached weight. Everything else (FP6, int6,
grouped convolutions) has no route: the layer runs its dense reference path. A weight-only int or binary linear
layer whose ``kernel_activations`` is ``"int8"``
(`lowbit.pack(..., kernel_activations="int8")`) takes the ``…a8`` kernel, quantizing its input per token to int8
inside the kernel as ONNX Runtime's ``accuracy_level=4`` does: faster on CPUs, at the cost of that rounding (not in
the simulated model). A linear layer's explicit input scale (AWQ / SmoothQuant) is applied in the same C call
(`layer.with_input_scale`).

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
from lowbit.formats.registry import ACT_FORMATS
from lowbit.formats.scales import MAX_SCALE, MIN_SCALE
from lowbit.formats.spec import QuantSpec

GROUPS = (32, 64, 128)


#: Ternary layers with rows this short run the int8 kernel on their {-1, 0, 1} codes: it has 8-row tiles for rows
#: of <= 96 (one reduction per 8 outputs), where the 2-bit kernel pads each row to 128 and sums each output alone.
SHORT_ROWS = 96


#: On AVX2 builds, ternary layers with rows up to this long (K) also get int8 panels (`kernels.panels`), which
#: `lb_linear` runs for calls of 32+ rows: there the panels' lane-wise sums beat the 2-bit kernel's per-output
#: reductions, while on longer rows, or fewer of them, the 2-bit kernel (a quarter of the bytes, int16 sums) stays
#: ahead. With AVX-512 VNNI the panels lead from 16 rows at any K (`python benchmarks/panels.py`; results in
#: benchmarks/results/panels-*.md).
TERNARY_PANEL_K = 768
#: On AVX2 builds, group-wise int2-4 layers with int8 activations get panels (int8 codes of q − z, twice an int4
#: layer's bytes) only up to this many weights: on larger, memory-bound layers their 4-bit kernel stays ahead at
#: 16 rows. With AVX-512 VNNI the panels lead there too (`python benchmarks/panels.py`).
WN_PANEL_MAX_WEIGHTS = 1 << 22


def panel_rows(kind: str) -> int:
    """Input rows from which the loaded library runs the many-row kernels of a layer kind (``w8``, ``wn``,
    ``ternary``, ``binary_inter``: binary weights with int8 activations, ``binary_blocked``: with sign activations,
    whose ±1 panels only the AMX tiles run): decided in C per build (fewer rows with AVX-512 VNNI; binary_blocked 0
    where the tiles are off); 0 without the library."""
    from lowbit.kernels import native

    return int(native._need().lb_panel_rows(native.WKINDS[kind])) if native.available() else 0


def f32_panel_rows() -> int:
    """Input rows from which weight-only layers with fp32 inputs run their panels (`panels.matmul_f32_panel`:
    weights dequantized a panel pair at a time into an fp32 register-tile GEMM); 0 without the library."""
    from lowbit.kernels import native

    return int(native._need().lb_f32_panel_rows()) if native.available() else 0


def _vnni() -> bool:
    from lowbit.kernels import native

    return native.build_info()["isa"] == "avx512vnni"


@dataclass(frozen=True)
class Route:
    """One packed layer's native kernel: ``prepare(layer)`` builds its `layer.NativeLinear` once;
    ``prepare(layer, panels=True)`` adds the many-row layout where the route has one (``panel_rows`` > 0: the input
    rows from which it runs), which dispatch asks for on the first call with that many rows, so a layer only ever
    called on a few rows (decoding) keeps one copy of its weights."""

    kernel: str
    prepare: Callable[..., Any]
    panel_rows: int = 0


def _is_int8_token(spec: QuantSpec | None) -> bool:
    return (
        spec is not None
        and spec.kind == "int"
        and spec.bits == 8
        and spec.symmetric
        and spec.dynamic
        and spec.granularity == "token"
    )


def _is_int8_static(spec: QuantSpec | None) -> bool:
    return spec is not None and spec.kind == "int" and spec.bits == 8 and not spec.dynamic


def _is_binary_token(spec: QuantSpec | None) -> bool:
    return spec is not None and spec.kind == "binary" and spec.dynamic and spec.granularity == "token"


def int8_token_constants(act: QuantSpec | None) -> tuple[float, float, float] | None:
    """``(qmax, min_scale, max_scale)`` of a dynamic symmetric per-token int8 activation quantizer, else None."""
    if not _is_int8_token(act):
        return None
    assert act is not None
    return float(integer.qrange(act.bits, True)[1]), MIN_SCALE, MAX_SCALE


def _act_mode(act: QuantSpec | None) -> tuple[str, dict[str, Any]]:
    """The kernel's activation mode and quantizer constants for an activation spec (None: fp32 inputs)."""
    if act is None:
        return "f32", {}
    if _is_binary_token(act):
        return "sign", {"min_scale": MIN_SCALE, "max_scale": MAX_SCALE, "sign_scale": act.scale_method != "none"}
    constants = int8_token_constants(act)
    assert constants is not None  # route_for passes only int8-per-token or binary-per-token specs here
    qmax, min_scale, max_scale = constants
    return "int8", {"qmax": qmax, "min_scale": min_scale, "max_scale": max_scale}


def _kernel_group(spec: QuantSpec, k: int) -> int | None:
    """The kernel group size of a group-wise format on rows of length ``k`` (one short group when k < size)."""
    if spec.granularity != "group" or spec.group_size is None:
        return None
    g = spec.group_size if k % spec.group_size == 0 else k if k < spec.group_size else None
    return g if g in GROUPS else None


def _prepare_groups(
    lay: Any, codes: torch.Tensor, bits: int, group: int, planes: bool = False
) -> tuple[Any, torch.Tensor | None]:
    """Group-wise weights (``codes``: the layer's, read once by the caller: a packed layer unpacks them on each read)
    in the wN layout (``planes``: int2 as bit planes, `group_layout.prepare_wn`); real-valued zero points go to the
    ``s·z`` correction instead."""
    from lowbit.kernels import group_layout

    s, z = lay.scale.float(), lay.zero.float()
    codes = codes.to(torch.uint8)
    if bool(torch.equal(z, z.round())):
        return group_layout.prepare_wn(codes, s, z, bits, group, planes=planes), None
    return group_layout.prepare_wn(codes, s, torch.zeros_like(z), bits, group, planes=planes), s * z


def _int2_planes(mode: str) -> bool:
    """Whether int2 codes with fp32 inputs take the bit-plane layout: AVX-512 builds, whose fp32 kernel adds x under
    the planes as write masks (one row 4096 × 4096: 4.3× → 6.5× fp32 on the session-23 Xeon; the AVX2 kernel would
    only decode them back)."""
    return mode == "f32" and _vnni()


def _fp8_route(w: QuantSpec, act: QuantSpec | None, n: int) -> Route | None:
    """FP8 weights (E4M3 / E5M2 bytes, per-channel or per-tensor scale) with fp32 inputs or dynamic per-token
    low-bit float ones (``fp8a32`` / ``fp8a8``): panels of the bytes, decoded exactly in the fp32 panel kernel, on
    every row count (no row layout); the float activations are fake-quantized per row in the same C call (the
    values of the simulated quantizer, `fakequant`). Sums in another order than the dense product's: equal within
    fp32 rounding."""
    from lowbit.formats import lowfloat
    from lowbit.kernels import layer as native_layer
    from lowbit.kernels import panels as panels_mod

    if act is None:
        mode, kw = "f32", {}
    elif act.kind == "fp" and act.dynamic and act.granularity == "token" and act.fp_format is not None:
        lay = lowfloat.layout(str(act.fp_format))
        mode = "fp"
        kw = {"qmax": lay.max_value, "min_scale": MIN_SCALE, "max_scale": MAX_SCALE}
        kw["fp_layout"] = (lay.man_bits, lay.emin, lay.emax)
    else:
        return None
    exp_bits = lowfloat.layout(str(w.fp_format)).exp_bits

    def prep_fp8(lay: Any, panels: bool = False) -> Any:
        p = panels_mod.prepare_fp8_panels(lay.codes, lay.scale.reshape(-1).float().expand(n), exp_bits)
        return native_layer.describe(p, mode, **kw)

    return Route("fp8a8" if mode == "fp" else "fp8a32", prep_fp8)


def awaits_calibration(layer: nn.Module) -> bool:
    """Whether a layer's static activation quantizer has no range yet: its route is decided once it has."""
    act = getattr(layer, "act", None)
    return act is not None and not act.spec.dynamic and not act.calibrated


def static_weight_sums(w: torch.Tensor) -> torch.Tensor:
    """``Σₖ W[n, k]`` per output of a dequantized weight matrix (N, K), summed in float64: with static zero-point
    activations the kernels see codes ``q − 128``, and ``scale · (128 − zero) · Σₖ W[n, k]`` restores the rest."""
    return w.detach().double().sum(dim=1).float()


def route_for(layer: nn.Module) -> Route | None:
    """The native route of a packed linear layer, or None when its format has no fast kernel.

    Static per-tensor int8 activations (calibrated scale and zero point) take the route of dynamic per-token int8
    ones, their codes made in the same C call from the quantizer's calibrated range (`layer.with_static_activations`,
    a copy the quantizer keeps in step: `ActQuantizer.kernel_range`): kernel names end in ``-static``. A static
    quantizer not calibrated yet has no route (`awaits_calibration`)."""
    act: QuantSpec | None = getattr(layer, "act_spec", None)
    if not _is_int8_static(act):
        return _route(layer)
    quantizer = layer.act
    zero = quantizer.zero
    if quantizer.scale.dtype is not torch.float32 or (zero is not None and zero.dtype is not torch.float32):
        return None
    if not quantizer.calibrated:  # the reference path says so
        return None
    route = _route(layer, ACT_FORMATS["int8_token"])
    if route is None:
        return None
    inner = route.prepare

    def prep_static(lay: Any, panels: bool = False) -> Any:
        from lowbit.formats.qtensor import dequantize
        from lowbit.kernels import layer as native_layer

        q = lay.act
        qrange = integer.qrange(8, q.spec.symmetric)
        cached = lay.weight_fp is not None or lay._cache is not None  # (else dequantized without filling the cache)
        w = lay.weight_matrix() if cached else dequantize(lay.qweight())
        return native_layer.with_static_activations(inner(lay, panels), q.kernel_range(), qrange, static_weight_sums(w))

    return Route(route.kernel + "-static", prep_static, route.panel_rows)


def _route(layer: nn.Module, act_override: QuantSpec | None = None) -> Route | None:
    """`route_for` for dynamic or no activation quantization (``act_override``: the activation spec to route as)."""
    from lowbit.kernels import group_layout, native
    from lowbit.kernels import layer as native_layer
    from lowbit.kernels import panels as panels_mod
    from lowbit.nn.packed import PackedConv2d, PackedLinear

    conv_as_linear = isinstance(layer, PackedConv2d) and layer.groups == 1 and layer.patch_kernel
    if not (isinstance(layer, PackedLinear) or conv_as_linear):
        return None
    w: QuantSpec = layer.weight_spec
    act: QuantSpec | None = act_override or layer.act_spec
    opt_in = getattr(layer, "kernel_activations", "exact") == "int8" and not conv_as_linear
    if act is None and opt_in and w.kind in ("int", "binary"):
        # opt-in: weight-only linear layers take int8 inputs inside the kernel (a conv's dense path is the conv on
        # its fp32 map, so a weight-only conv keeps fp32 patches: its output never depends on the path taken)
        act = ACT_FORMATS["int8_token"]
    n, k = layer._matrix_shape
    if w.kind == "fp" and w.bits == 8 and w.granularity in ("channel", "tensor"):
        return _fp8_route(w, act, n)
    if act is not None and not (_is_int8_token(act) or _is_binary_token(act)):
        return None
    mode, kw = _act_mode(act)
    suffix = {"f32": "a32", "int8": "a8", "sign": "a1"}[mode]

    def with_panels(codes: torch.Tensor, scale: torch.Tensor, wanted: bool) -> dict[str, Any]:
        """The many-row layout of int8 codes (`kernels.panels`) for a layer with int8 or fp32 activations, when
        wanted."""
        return {"panels": panels_mod.prepare_panels(codes, scale)} if wanted and mode in ("int8", "f32") else {}

    many_f32 = f32_panel_rows() if mode == "f32" else 0

    if w.kind == "int" and w.bits == 8 and w.symmetric and w.granularity == "channel" and mode != "sign":

        def prep_w8(lay: Any, panels: bool = False) -> Any:
            codes, scale = lay.codes.to(torch.int8), lay.scale.reshape(n).float()
            if mode == "int8" and panel_rows("w8") == 1:
                # Panels serve every row count (AVX-512 VNNI builds): the layer keeps no row layout.
                rowless = native.PreparedW8(torch.empty(0, dtype=torch.int8), scale, n, k, k)
                return native_layer.describe(rowless, mode, panels=panels_mod.prepare_panels(codes, scale), **kw)
            extra = with_panels(codes, scale, panels)
            return native_layer.describe(native.prepare_w8(codes, scale), mode, **extra, **kw)

        return Route(f"w8{suffix}", prep_w8, panel_rows("w8") if mode == "int8" else many_f32)

    group = _kernel_group(w, k)
    if w.kind == "int" and w.bits in (2, 3, 4) and not w.symmetric and group is not None and mode != "sign":
        bits, g = w.bits, group

        def prep_wn(lay: Any, panels: bool = False) -> Any:
            codes = lay.codes  # (unpacked once here)
            prepared, sz = _prepare_groups(lay, codes, bits, g, planes=bits == 2 and _int2_planes(mode))
            extra = {}
            if panels and mode in ("int8", "f32"):  # real-valued zero points: panels of q, the same s·z correction
                z = lay.zero.float() if sz is None else torch.zeros_like(lay.zero, dtype=torch.float32)
                extra["panels"] = panels_mod.prepare_group_panels(codes, lay.scale.float(), z, g)
            return native_layer.describe(prepared, mode, sz=sz, **extra, **kw)

        many = panel_rows("wn") if mode == "int8" and (n * k <= WN_PANEL_MAX_WEIGHTS or _vnni()) else many_f32
        return Route(f"w{bits}{suffix}", prep_wn, many)

    if w.kind == "fp" and w.fp_format == "e2m1" and group is not None and mode == "f32":
        # FP4 (E2M1) values times 2 are the integers 0, ±1, ±2, ±3, ±4, ±6, ±8, ±12: with the group scales halved
        # they hold exactly the dequantized weights (code · s/2 rounds like value · s). A few rows run the row kernel
        # on the 4-bit codes (`group_layout.prepare_e2m1`: the int4 layout read through a table), many rows the fp32
        # panel kernel on group panels of the values × 2 (before the row kernel, the panels served every row count:
        # at one row they dequantized the whole matrix per call, 0.55× fp32 on an AVX2 build).
        g = group

        def prep_fp4(lay: Any, panels: bool = False) -> Any:
            half = lay.scale.float().reshape(n, k // g) / 2
            # The stored codes are E2M1 bit patterns (sign bit 3), in the order of group_layout.E2M1_X2: no dequantized
            # copy of the weights is made (nor cached on the layer).
            codes = torch.tensor(group_layout.E2M1_X2, dtype=torch.float32)[lay.codes.reshape(n, k).long()]
            zero = torch.zeros_like(half)
            extra = {"panels": panels_mod.prepare_group_panels(codes, half, zero, g)} if panels else {}
            return native_layer.describe(group_layout.prepare_e2m1(codes, half, g), mode, **extra)

        return Route("fp4a32", prep_fp4, many_f32)

    if w.kind == "ternary" and mode == "int8":

        def prep_ternary(lay: Any, panels: bool = False) -> Any:
            codes, scale = lay.codes.to(torch.int8), lay.scale.reshape(-1).float()
            # Short rows: the int8 layout's 8-row tiles (same int32 sums, same final product, so the same bits).
            if k <= SHORT_ROWS:
                prepared = native.prepare_w8(codes, scale.expand(n))
            else:
                prepared = native.prepare_ternary(codes, scale)
            extra = with_panels(codes, scale.expand(n), panels and ternary_panels)
            return native_layer.describe(prepared, mode, **extra, **kw)

        ternary_panels = k <= TERNARY_PANEL_K or _vnni()
        return Route("ternary", prep_ternary, panel_rows("ternary") if ternary_panels else 0)
    if w.kind == "ternary" and mode == "f32":
        tg = next((g for g in reversed(GROUPS) if k % g == 0), None)
        if tg is None:
            return None

        def prep_t2(lay: Any, panels: bool = False) -> Any:  # codes + 1 as 2-bit with zero point 1
            s = lay.scale.reshape(-1).float().expand(n).reshape(n, 1).expand(n, k // tg).contiguous()
            codes = (lay.codes + 1).to(torch.uint8)
            prepared = group_layout.prepare_wn(codes, s, torch.ones_like(s), 2, tg, planes=_int2_planes(mode))
            extra = {"panels": panels_mod.prepare_group_panels(codes, s, torch.ones_like(s), tg)} if panels else {}
            return native_layer.describe(prepared, mode, **extra)

        return Route("w2a32", prep_t2, many_f32)

    if w.kind == "binary":
        layout = ("a1",) if mode == "sign" else ("a8",)

        # Many sign rows (W1A1) where the AMX tiles are on: the same ±1 panels, which the tiles multiply by the signs
        # as ±1 bytes (the popcount kernel's int32 sums, so its bits); 0 rows (no panels) elsewhere.
        many_signs = panel_rows("binary_blocked") if mode == "sign" else 0

        def prep_binary(lay: Any, panels: bool = False) -> Any:
            signs, scale = lay.codes > 0, lay.scale.reshape(-1).float().expand(n).contiguous()
            # Many int8 rows: panels of the ±1 codes (the same int32 sums as the bit kernel, so the same bits).
            codes = signs.to(torch.int8) * 2 - 1
            signs_panels = panels and many_signs  # (with_panels serves int8 / fp32 inputs)
            extra = (
                {"panels": panels_mod.prepare_panels(codes, scale)}
                if signs_panels
                else with_panels(codes, scale, panels)
            )
            return native_layer.describe(native.prepare_binary(signs, scale, layouts=layout), mode, **extra, **kw)

        many = panel_rows("binary_inter") if mode == "int8" else many_signs if mode == "sign" else many_f32
        return Route(f"w1{suffix}", prep_binary, many)
    return None
