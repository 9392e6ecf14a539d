"""One packed layer as the C entry ``lb_linear`` runs it: activation quantization, kernel and bias in one call.

`describe` binds weights prepared by `lowbit.kernels.native` (``prepare_w8`` / ``prepare_ternary`` / ``prepare_binary``;
`lowbit.kernels.group_layout`: ``prepare_wn`` / ``prepare_e2m1``) and the layer's activation quantizer into a
`NativeLinear` once; `linear` then runs it.

Example:
    >>> import torch
    >>> from lowbit.kernels import layer, native
    >>> if native.available():
    ...     p = native.prepare_w8(torch.randint(-127, 128, (8, 64), dtype=torch.int8), torch.ones(8))
    ...     d = layer.describe(p, "int8", min_scale=2.0**-20)
    ...     tuple(layer.linear(d, torch.randn(3, 64)).shape)
    ... else:
    ...     (3, 8)
    (3, 8)
"""

from __future__ import annotations

import ctypes
from typing import Any

import torch

from lowbit.kernels.group_layout import PreparedWN
from lowbit.kernels.native import (
    AKINDS,
    WKINDS,
    LayerDesc,
    PreparedBinary,
    PreparedTernary,
    PreparedW8,
    _as,
    _need,
    _ptr,
    empty_f32,
)
from lowbit.kernels.panels import PreparedPanels


class NativeLinear:
    """A prepared layer as `linear` runs it: the C ``lb_layer`` description and the tensors it points into
    (held here, so they live as long as the description)."""

    def __init__(self, desc: LayerDesc, keep: tuple) -> None:
        self.desc, self._keep = desc, keep
        self.addr = ctypes.addressof(desc)
        self.N, self.K = int(desc.N), int(desc.K)
        self.has_panels = bool(desc.wp)  # the many-row layout (`kernels.panels`) is bound

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._keep if isinstance(t, torch.Tensor))

    def __reduce__(self) -> Any:
        raise TypeError("a NativeLinear holds raw pointers into its tensors: describe() a copy of the weights")


def describe(
    p: PreparedW8 | PreparedWN | PreparedTernary | PreparedBinary | PreparedPanels,
    act: str,
    *,
    qmax: float = 127.0,
    min_scale: float = 0.0,
    max_scale: float = 65504.0,
    sign_scale: bool = True,
    sz: torch.Tensor | None = None,
    panels: PreparedPanels | None = None,
    fp_layout: tuple[int, int, int] | None = None,
) -> NativeLinear:
    """Bind prepared weights ``p`` and an activation mode (``"f32"``, ``"int8"``: symmetric per row with ``qmax``
    and the scale guards, ``"sign"``: signs with mean |x| scales when ``sign_scale``, ``"fp"``: low-bit float per
    row, ``fp_layout`` = (mantissa bits, emin, emax) and largest value ``qmax``) into one `NativeLinear`. FP8
    weights come as their panels alone (`panels.prepare_fp8_panels`: no row layout) and take fp32 / fp inputs.
    ``sz`` (N, K/group) fp32 = scale·zero for group-wise weights with real-valued zero points (the blob must
    then hold zero points 0). ``panels``: the same codes (int8, ternary, or q − z of int2-4 groups) in the many-row
    layout of `kernels.panels` (`prepare_panels` / `prepare_group_panels`), which `lb_linear` runs from the
    route's row count on (`routes.Route.panel_rows`; int8 activations, and fp32 ones: `panels.matmul_f32_panel`)."""
    d = LayerDesc(akind=AKINDS[act], qmax=qmax, min_scale=min_scale, max_scale=max_scale, sign_scale=int(sign_scale))
    if act == "fp":
        assert fp_layout is not None, "low-bit float activations need their (mantissa bits, emin, emax)"
        d.fp_man, d.fp_emin, d.fp_emax = fp_layout
    keep: list = [p]
    if isinstance(p, PreparedW8):
        d.wkind, d.w, d.s, d.ld = WKINDS["w8"], _ptr(p.w), _ptr(p.s), p.Kp
        keep += [p.w, p.s]
    elif isinstance(p, PreparedWN):
        d.wkind, d.w, d.ld, d.bits, d.group = WKINDS["wn"], _ptr(p.blob), p.row_bytes, p.bits, p.group
        keep.append(p.blob)
        if sz is not None:
            sz = _as(sz, torch.float32).reshape(p.N, p.K // p.group).t().contiguous()  # (G, N) for the C loop
            d.sz = _ptr(sz)
            keep.append(sz)
    elif isinstance(p, PreparedTernary):
        d.wkind, d.w, d.s = WKINDS["ternary"], _ptr(p.w), _ptr(p.sw)
        keep += [p.w, p.sw]
    elif isinstance(p, PreparedBinary):
        w = p.blocked if act == "sign" else p.inter
        assert w is not None, f"prepare_binary(..., layouts) lacks the layout for {act} activations"
        d.wkind = WKINDS["binary_blocked" if act == "sign" else "binary_inter"]
        d.w, d.s = _ptr(w), _ptr(p.a)
        keep += [w, p.a]
    elif isinstance(p, PreparedPanels) and p.fp_exp:
        assert act in ("f32", "fp"), "FP8 weights run the fp32 kernel: fp32 or low-bit float inputs"
        d.wkind, d.bits, panels = WKINDS["fp8"], p.fp_exp, p
    else:
        raise TypeError(f"no native kernel for {type(p).__name__}")
    if panels is not None and act in ("int8", "f32", "fp", "sign"):
        assert (panels.N, panels.K) == (p.N, p.K), "panels of another layer"
        d.wp, d.sp, d.pld, d.ws = _ptr(panels.wp), _ptr(panels.sp), panels.Kp, _ptr(panels.ws)
        keep += [panels.wp, panels.sp, panels.ws]
    d.N, d.K = p.N, p.K
    return NativeLinear(d, tuple(keep))


def with_input_scale(layer: NativeLinear, scale: torch.Tensor) -> NativeLinear:
    """``layer`` multiplying its input by ``scale`` (K,) per channel before its activation quantization (a linear
    layer's explicit input scale: AWQ / SmoothQuant where nothing absorbs it), in the same C call: the products of
    the simulated layer's ``x * scale``, so the same codes."""
    scale = _as(scale, torch.float32).reshape(-1).contiguous()
    assert scale.numel() == layer.K, f"input scale of {scale.numel()} values for a layer of K={layer.K}"
    layer.desc.xs = _ptr(scale)
    layer._keep = (*layer._keep, scale)
    return layer


def with_static_activations(
    layer: NativeLinear, rng: torch.Tensor, qrange: tuple[int, int], wsum: torch.Tensor
) -> NativeLinear:
    """``layer`` (described with ``"int8"`` activations) quantizing its input with a static per-tensor range instead:
    codes ``clamp(rint(x / scale + zero), qmin, qmax)`` (the simulated `ActQuantizer`'s), which the kernels see as
    the signed codes ``q − (qmin + 128)`` with row scale ``scale``; the constant term that shift and the zero point
    leave per output, ``scale · (qmin + 128 − zero) · wsum[n]`` with ``wsum[n] = Σₖ W[n, k]`` of the dequantized
    weights, is added before the bias. ``rng``: the fp32 ``[scale, zero]`` the kernel reads on every call (zero 0
    for a symmetric range): `ActQuantizer.kernel_range`, which the quantizer keeps in step with its range."""
    assert rng.dtype is torch.float32 and rng.shape == (2,) and rng.is_contiguous(), "an fp32 [scale, zero]"
    wsum = _as(wsum, torch.float32).reshape(-1).contiguous()
    assert wsum.numel() == layer.N, f"weight sums of {wsum.numel()} values for a layer of N={layer.N}"
    assert layer.desc.akind == AKINDS["int8"], "static activations replace an int8 activation quantizer"
    d = layer.desc
    d.akind, d.sa, d.za, d.wsum = AKINDS["int8s"], _ptr(rng), _ptr(rng) + 4, _ptr(wsum)
    d.qmin, d.qmax = float(qrange[0]), float(qrange[1])
    layer._keep = (*layer._keep, rng, wsum)
    return layer


def linear(layer: NativeLinear, x: torch.Tensor, threads: int = 1, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = act_quant(x) · W^T (+ bias) in one C call (`lb_linear`), for fp32 ``x`` of shape (..., K): the leading
    dimensions are rows, as in ``F.linear``, and ``y`` has shape (..., N).

    This runs on every packed-layer forward, so it reshapes nothing and checks only what a wrong pointer would
    break (each tensor operation costs microseconds, as much as a small layer's kernel). ``bias``: N values, or one
    broadcast as ``F.linear`` does (converted to contiguous fp32 on the CPU); another size raises ValueError."""
    if x.dtype is not torch.float32 or not x.is_contiguous():
        x = _as(x, torch.float32)
    shape = x.shape
    if not shape or shape[-1] != layer.K:
        raise ValueError(f"input of shape {tuple(shape)}: the layer expects (..., {layer.K})")
    y = empty_f32(shape[0], layer.N) if len(shape) == 2 else empty_f32(*shape[:-1], layer.N)
    if bias is not None and (
        bias.dtype is not torch.float32 or not bias.is_contiguous() or not bias.is_cpu or bias.numel() != layer.N
    ):
        if bias.numel() not in (1, layer.N):
            raise ValueError(f"bias of {bias.numel()} values for a layer of {layer.N} outputs")
        bias = _as(bias.reshape(1).expand(layer.N) if bias.numel() == 1 else bias.reshape(layer.N), torch.float32)
    rc = _need().lb_linear(
        layer.addr, x.data_ptr(), x.numel() // layer.K, y.data_ptr(), threads, None if bias is None else bias.data_ptr()
    )
    if rc:
        raise RuntimeError("lb_linear: " + ("out of memory" if rc == -2 else "layer description has no kernel"))
    return y
