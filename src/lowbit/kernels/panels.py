"""int8 weights as 16-column panels: the layout of the many-row W8A8 kernel (``lb_w8a8_panel``).

The row layout of `native.prepare_w8` streams each weight row once per call, which suits one or a few input rows
(decoding, batch 1). With many rows (a convolution's patches, a batch of tokens) the work is compute-bound, and
there the panel layout wins: 16 output columns × 4 consecutive k per 64 bytes, so one broadcast of 4 activation
codes meets 8 columns per vector, each column's int32 sum stays in its lane (no horizontal sums), and a tile of
4 rows × 16 columns reads its weights once. Rows whose codes are all non-negative (inputs after a ReLU) skip the
sign trick of the signed × signed product. The int32 sums and the final ``(sx·s)·acc`` are those of the row
kernels, so the outputs are the same bits (W8A8 and ternary codes alike).

On a CPU with AVX-512 VNNI (built with ``-march=native``) a tile is 8 rows × 16 columns in zmm registers and one
``vpdpbusd`` adds 64 products straight into int32. Its first operand is unsigned, so the rows go in as x + 128 (one
XOR per byte) and ``128·Σ_k w`` per column (`panel_sums`, kept with the panels) is subtracted: the same exact int32
sums, hence the same bits again, at about three times the AVX2 tiles' speed (`benchmarks/panels.py`).

`layer.describe` adds the panels to a layer's description (dispatch asks for them on the layer's first call with
enough rows: `routes.Route.panel_rows`); `lb_linear` / `lb_conv` use them from 4 input rows on (ternary layers,
whose 2-bit kernel streams a quarter of the bytes: from 32 rows on and only with rows of K ≤ 768,
`routes.TERNARY_PANEL_K`, on AVX2; from 16 rows at any K with VNNI; `routes.panel_rows`). With VNNI, W8A8 layers
run panels at every row count (faster than the row kernel from 1 row on in `benchmarks/panels.py`), so
they keep no row layout at all.

Weight-only layers (fp32 inputs) run the same panels from 8 rows on with `matmul_f32_panel`: two
panels at a time dequantized to fp32 (code × scale) and an FMA register tile over them; equal to the dense product
within fp32 rounding (not bit for bit: another order of fp32 sums); `routes.f32_panel_rows` gives the row count.

Example:
    >>> import torch
    >>> from lowbit.kernels import native, panels
    >>> q = torch.randint(-127, 128, (40, 100), dtype=torch.int8)
    >>> if native.available():
    ...     p = panels.prepare_panels(q, torch.rand(40))
    ...     xq, sx = torch.randint(-127, 128, (9, 100), dtype=torch.int8), torch.rand(9)
    ...     y = panels.matmul_w8a8_panel(xq, sx, p)
    ...     ref = native.matmul_w8a8(xq, sx, native.prepare_w8(q, p.sp[:40]))
    ...     bool(torch.equal(y, ref))
    ... else:
    ...     True
    True
"""

from __future__ import annotations

import torch

from lowbit.kernels.native import _as, _int8_call, _need, _ptr, _rup, _vec, empty_f32

#: Output columns per panel (two AVX2 vectors of int32 sums).
PANEL = 16


class PreparedPanels:
    """wp: int8 (N/16, Kp/4, 16, 4) panels, N padded to 16 columns and K to Kp (a multiple of 32) with zeros;
    sp: fp32 scales (padded N,), zero past N; for group-wise weights (``group`` > 0) per panel and group,
    (N/16, K/group, 16); ws: int32 column sums of the codes in the shape of sp (per group for group-wise weights),
    which the AVX-512 VNNI tiles subtract (they multiply x + 128 as an unsigned byte: `panel_sums`)."""

    def __init__(
        self,
        wp: torch.Tensor,
        sp: torch.Tensor,
        N: int,
        K: int,
        Kp: int,
        group: int = 0,
        ws: torch.Tensor | None = None,
        fp_exp: int = 0,
    ) -> None:
        self.wp, self.sp, self.N, self.K, self.Kp, self.group = wp, sp, N, K, Kp, group
        self.fp_exp = fp_exp  # 0: int8 codes; 4 / 5: FP8 bytes (E4M3 / E5M2) that only the fp32 kernel reads
        self.ws = panel_sums(wp, group) if ws is None else ws

    @property
    def nbytes(self) -> int:
        return self.wp.numel() + 4 * self.sp.numel() + 4 * self.ws.numel()


def panel_sums(wp: torch.Tensor, group: int = 0) -> torch.Tensor:
    """Column sums of panels ``wp`` (P, Kp/4, 16, 4) as int32: (P·16,) over all of K, or (P, Kp/group, 16) per
    group of ``group`` k. ``Σ_k (x + 128)·w − 128·Σ_k w`` is the exact ``Σ_k x·w`` the VNNI tiles return."""
    P, Q = wp.shape[0], wp.shape[1]
    per_k = wp.to(torch.int32).sum(-1)  # (P, Kp/4, 16): the 4 k of each quad (torch sums integers as int64)
    sums = per_k.view(P, Q * 4 // group, group // 4, PANEL).sum(2) if group else per_k.sum(1).reshape(P * PANEL)
    return sums.to(torch.int32).contiguous()


def _panel_codes(q: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """int8 codes (N, K) as (N/16, Kp/4, 16, 4) panels (zero padded), with the padded N and K."""
    N, K = q.shape
    Np, Kp = _rup(N, PANEL), _rup(K, 32)
    w = torch.zeros(Np, Kp, dtype=torch.int8)
    w[:N, :K] = q
    return w.view(Np // PANEL, PANEL, Kp // 4, 4).permute(0, 2, 1, 3).contiguous(), Np, Kp


def prepare_panels(q: torch.Tensor, s: torch.Tensor) -> PreparedPanels:
    """Panels of int8 codes ``q`` (N, K) in [-127, 127] with per-row scales ``s`` (N,) (a per-tensor scale:
    expanded)."""
    q = _as(q, torch.int8)
    N, K = q.shape
    wp, Np, Kp = _panel_codes(q)
    return PreparedPanels(wp, _column_scales(s, N, Np), N, K, Kp)


def _column_scales(s: torch.Tensor, N: int, Np: int) -> torch.Tensor:
    """Per-row scales ``s`` (N,) (or one: expanded) padded with zeros to the panels' Np columns."""
    sp = torch.zeros(Np, dtype=torch.float32)
    sp[:N] = _vec(s).expand(N) if s.numel() == 1 else _vec(s)
    return sp


def prepare_fp8_panels(codes: torch.Tensor, s: torch.Tensor, exp_bits: int) -> PreparedPanels:
    """Panels of FP8 bit patterns ``codes`` (N, K) uint8 (E4M3: ``exp_bits`` 4, E5M2: 5; `lowfloat.encode`) with
    per-row scales ``s`` (N,): the layout of `matmul_f32_panel`, which decodes the bytes exactly in the kernel
    (zero padding decodes to +0). Only fp32-input kernels read them (no column sums). NaN / inf bit patterns, which
    the encoder never writes, become +0, as `lowfloat.decode_table` reads them."""
    assert exp_bits in (4, 5), "FP8 panels hold E4M3 or E5M2 bytes"
    u8 = _as(codes, torch.uint8)
    special = 0x7F if exp_bits == 4 else 0x7C  # E4M3's NaN patterns; E5M2's inf / NaN ones (all exponent bits)
    bad = (u8 & special) == special
    if bool(bad.any()):  # never written by lowfloat.encode; decode_table (the reference path) reads them as 0
        u8 = u8.masked_fill(bad, 0)
    N, K = codes.shape
    wp, Np, Kp = _panel_codes(u8.view(torch.int8))
    return PreparedPanels(wp, _column_scales(s, N, Np), N, K, Kp, ws=torch.zeros(0, dtype=torch.int32), fp_exp=exp_bits)


def prepare_group_panels(q: torch.Tensor, s: torch.Tensor, z: torch.Tensor, group: int) -> PreparedPanels:
    """Panels of group-wise codes: ``q`` (N, K) unsigned codes, ``s`` / ``z`` (N, K/group) scales and integer
    zero points; the panels hold ``q − z`` (exact in int8 for ≤ 7-bit codes), the scales go per panel and group.
    K must be a multiple of ``group`` (32, 64 or 128)."""
    N, K = q.shape
    assert group in (32, 64, 128) and K % group == 0, f"K={K} must be a multiple of group={group} (32, 64, 128)"
    G = K // group
    zs = z.float().reshape(N, G).repeat_interleave(group, dim=1)
    d = (q.float() - zs).round()
    assert d.numel() == 0 or float(d.abs().max()) <= 127, "codes minus zero points must fit int8"
    wp, Np, Kp = _panel_codes(d.to(torch.int8))
    sg = torch.zeros(Np, G, dtype=torch.float32)
    sg[:N] = _as(s, torch.float32).reshape(N, G)
    spg = sg.view(Np // PANEL, PANEL, G).permute(0, 2, 1).contiguous()  # (P, G, 16)
    return PreparedPanels(wp, spg, N, K, Kp, group)


def matmul_w8a8_panel(xq: torch.Tensor, sx: torch.Tensor, p: PreparedPanels, threads: int = 1) -> torch.Tensor:
    """y = (sx[m]·s[n]) · float32(Σ_k xq·q) for int8 ``xq`` (M, K) in [-127, 127] (any M; `lb_linear` uses it
    from 4 rows on)."""
    xq, sx, M, K, y = _int8_call(xq, sx, p)
    _need().lb_w8a8_panel(_ptr(xq), _ptr(sx), M, K, _ptr(p.wp), _ptr(p.sp), _ptr(p.ws), p.N, p.Kp, _ptr(y), threads)
    return y


def matmul_wn_panel(xq: torch.Tensor, sx: torch.Tensor, p: PreparedPanels, threads: int = 1) -> torch.Tensor:
    """y = sx[m] · Σ_g s_g · (Σ_{k in g} xq·(q − z)) for group panels (`prepare_group_panels`); `lb_linear` uses it
    from 16 rows on."""
    xq, sx, M, K, y = _int8_call(xq, sx, p)
    lib = _need()
    lib.lb_wn_panel(_ptr(xq), _ptr(sx), M, K, _ptr(p.wp), _ptr(p.sp), _ptr(p.ws), p.N, p.Kp, p.group, _ptr(y), threads)
    return y


def matmul_f32_panel(x: torch.Tensor, p: PreparedPanels, threads: int = 1) -> torch.Tensor:
    """y = x · (codes · scales)^T for fp32 ``x`` (M, K) and any panels (`prepare_panels`: per-column scales;
    `prepare_group_panels`: per group; `prepare_fp8_panels`: FP8 bytes): the kernel of weight-only layers with fp32
    inputs on many rows, which `lb_linear` runs from `routes.f32_panel_rows` rows on (FP8 layers on every row
    count; from 16 rows on AMX-BF16 tiles where the CPU has them, each row as three bf16 parts). Equal to the dense
    product within fp32 rounding (on the tiles, terms below 2^-100 of a row's largest count as zero)."""
    x = _as(x, torch.float32).contiguous()
    M, K = x.shape
    assert K == p.K, f"x has {K} columns, the panels {p.K}"
    y = empty_f32(M, p.N)
    rc = _need().lb_f32_panel(_ptr(x), M, K, _ptr(p.wp), _ptr(p.sp), p.N, p.Kp, p.group, _ptr(y), threads, p.fp_exp)
    if rc:
        raise (
            MemoryError("lb_f32_panel: no memory for its scratch buffer")
            if rc == -2
            else ValueError("lb_f32_panel: FP8 panels take per-column scales only")
        )
    return y
