"""The many-row W8A8 kernel (`lowbit.kernels.panels`) against the row kernels and fp32 ``F.linear``, in one run.

For each (M, K, N): the int8 row kernel (``lb_w8a8``), the panel kernel on signed codes and on non-negative codes
(inputs after a ReLU: its sign-free product), the 2-bit ternary kernel (``lb_ternary``) on ternary codes and the
panels on them, int4 weights (groups of 128, or 64 / 32 where K needs) on their 4-bit kernel (``lb_wna8``) and on
group panels (``lb_wn_panel``), fp32 ``F.linear`` (MKL) and, where the panels run on AMX tiles, the W8A8 panels
with the tiles off (the VNNI kernel), timed in alternation
(`lowbit.kernels.dispatch.race`, best of rounds). Activation quantization is not included (the same for every int8
path). Shapes: decoding (M = 1-16 rows of 4096²), MiniLM (K = 384 / 1536, 45 rows at batch 1, more at batch 32),
the patches of a VGG-style CNN's convolutions (M = output positions, K = 9·C), the digits models.

    python benchmarks/panels.py --threads 1 2
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from lowbit.kernels import group_layout, native, panels
from lowbit.kernels.dispatch import race
from lowbit.measure.envinfo import environment

SHAPES = [
    (1, 4096, 4096),
    (2, 4096, 4096),
    (3, 4096, 4096),
    (4, 4096, 4096),
    (16, 4096, 4096),
    (16, 384, 1536),
    (640, 384, 1536),
    (1576, 384, 1536),
    (3136, 576, 64),
    (3136, 576, 128),
    (784, 1152, 256),
    (196, 2304, 256),
    (64, 288, 64),
    (45, 384, 1536),
    (45, 1536, 384),
    (128, 128, 10),
]


def _row(M: int, K: int, N: int, threads: int, g: torch.Generator, amx: bool) -> str:
    """One table row: every path on random codes of one shape, timed in alternation (with ``amx``: the W8A8 panels
    once more with the AMX tiles off)."""
    q = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
    t = torch.randint(-1, 2, (N, K), generator=g, dtype=torch.int8)
    s = torch.rand(N, generator=g) + 0.1
    xq = torch.randint(-127, 128, (M, K), generator=g, dtype=torch.int8)
    xpos, sx = xq.abs(), torch.rand(M, generator=g)
    rows, pan = native.prepare_w8(q, s), panels.prepare_panels(q, s)
    tern, tpan = native.prepare_ternary(t, s), panels.prepare_panels(t, s)
    gs = next(gs for gs in (128, 64, 32) if K % gs == 0)  # int4 groups: the largest of 128 / 64 / 32 dividing K
    q4 = torch.randint(0, 16, (N, K), generator=g, dtype=torch.uint8)
    s4, z4 = torch.rand(N, K // gs, generator=g) + 0.1, torch.randint(0, 16, (N, K // gs), generator=g).float()
    w4, w4p = group_layout.prepare_wn(q4, s4, z4, 4, gs), panels.prepare_group_panels(q4, s4, z4, gs)
    xf, wf = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g)

    def tiles_off() -> torch.Tensor:  # the same panels on the VNNI tiles (AMX off for this call)
        native.amx(False)
        try:
            return panels.matmul_w8a8_panel(xq, sx, pan, threads)
        finally:
            native.amx(True)

    row, panel, pos, t2, tp, i4, i4p, fp, *vnni = race(
        lambda: native.matmul_w8a8(xq, sx, rows, threads),
        lambda: panels.matmul_w8a8_panel(xq, sx, pan, threads),
        lambda: panels.matmul_w8a8_panel(xpos, sx, pan, threads),
        lambda: native.matmul_ternary(xq, sx, tern, threads),
        lambda: panels.matmul_w8a8_panel(xq, sx, tpan, threads),
        lambda: group_layout.matmul_wna8(xq, sx, w4, threads),
        lambda: panels.matmul_wn_panel(xq, sx, w4p, threads),
        lambda: F.linear(xf, wf),
        *([tiles_off] if amx else []),
    )
    tail = f" {vnni[0]:.3f} | {vnni[0] / panel:.2f}× |" if amx else ""
    return (
        f"| {threads} | {M} | {K} | {N} | {row:.3f} | {panel:.3f} | {pos:.3f} | {t2:.3f} | {tp:.3f} | {i4:.3f} "
        f"| {i4p:.3f} | {fp:.3f} | {row / panel:.2f}× | {fp / panel:.2f}× | {fp / pos:.2f}× | {t2 / tp:.2f}× "
        f"| {i4 / i4p:.2f}× |{tail}"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    args = ap.parse_args(argv)
    if not native.available():
        raise SystemExit(f"native kernels unavailable: {native.unavailable_reason()}")
    env = environment()
    amx = native.amx()
    print(f"CPU: {env.get('cpu', '?')}; torch {torch.__version__}; native kernels: {env['kernels']}")
    print("ms per call; ratios: row-kernel time / panel time, and fp32 time / panel time (> 1: panels faster)")
    print("| threads | M | K | N | row | panel | panel ≥0 | ternary 2-bit | ternary panel | int4 4-bit | int4 panel "
          "| fp32 | panel vs row | panel vs fp32 | panel ≥0 vs fp32 | ternary panel vs 2-bit "
          "| int4 panel vs 4-bit |" + (" panel, AMX off | panel vs AMX off |" if amx else ""))  # fmt: skip
    print("|---" * (19 if amx else 17) + "|")
    g = torch.Generator().manual_seed(0)
    for threads in args.threads:
        torch.set_num_threads(threads)
        for M, K, N in SHAPES:
            print(_row(M, K, N, threads, g, amx))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
