"""Convolutions with quantized activations: a packed CNN against its fp32 original, timed in alternation.

The embedded digits models have 8×8 inputs, where a convolution is mostly call overhead; this benchmark times a
plain VGG-style CNN of realistic width on larger images (random weights: speed does not depend on them) so the
per-patch kernels (`lb_conv`: patches cut and quantized per row, then the w8a8 / ternary / XNOR kernel) meet
oneDNN's fp32 convolutions on real work. Each row: best-of-rounds latency of the packed model and of the fp32
model, timed in alternation (`lowbit.kernels.dispatch.race`), and the packed model's largest output difference to
the simulated model.

    python benchmarks/convs.py --size 112 --batch-sizes 1 8 --threads 1 2
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import lowbit
from lowbit.kernels.dispatch import race
from lowbit.measure.envinfo import environment

PRESETS = ["w8a8", "ternary", "w1a1"]


def vgg_like(width: int = 64, classes: int = 100) -> nn.Module:
    """Six 3×3 conv + BatchNorm + ReLU blocks (widths w, w, 2w, 2w, 4w, 4w; stride 2 at each width change), pooled."""

    def block(cin: int, cout: int, stride: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

    w = width
    return nn.Sequential(
        block(3, w, 2), block(w, w, 1), block(w, 2 * w, 2), block(2 * w, 2 * w, 1), block(2 * w, 4 * w, 2),
        block(4 * w, 4 * w, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * w, classes),
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=112, help="input height and width (default: 112)")
    ap.add_argument("--width", type=int, default=64, help="channels of the first blocks (default: 64)")
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--presets", nargs="+", default=PRESETS)
    ap.add_argument("--rounds", type=int, default=3, help="alternating races per row; the best is kept")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    fp32 = vgg_like(args.width).eval()
    env = environment()
    print(f"CPU: {env.get('cpu', '?')}; torch {torch.__version__}; lowbit conv benchmark, {args.size}×{args.size}")
    print("| preset | batch | threads | packed ms | fp32 ms | vs fp32 | max diff to simulated (rel.) |")
    print("|---|---|---|---|---|---|---|")
    for preset in args.presets:
        simulated = lowbit.compress(fp32, preset, progress=False)
        packed = lowbit.pack(simulated).eval()
        for threads in args.threads:
            torch.set_num_threads(threads)
            for batch in args.batch_sizes:
                x = torch.randn(batch, 3, args.size, args.size)
                with torch.no_grad():
                    packed(x)  # dispatch decides each layer once per shape
                    ref = simulated(x)
                    err = float((packed(x) - ref).abs().max() / ref.abs().max())
                    run_packed, run_fp32 = (lambda m=packed, x=x: m(x)), (lambda x=x: fp32(x))
                    times = [race(run_packed, run_fp32) for _ in range(args.rounds)]
                t_packed, t_fp32 = min(t[0] for t in times), min(t[1] for t in times)
                print(
                    f"| {preset} | {batch} | {threads} | {t_packed:.2f} | {t_fp32:.2f} | {t_fp32 / t_packed:.2f}× "
                    f"| {err:.1e} |",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
