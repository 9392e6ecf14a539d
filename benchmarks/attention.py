"""lowbit's fp32 attention kernel (`lowbit.kernels.attention.sdpa`) against PyTorch's scaled_dot_product_attention,
timed in alternation in one run (`lowbit.measure.latency.compare_latency`, medians).

Both produce the layout a transformer continues with: PyTorch's output is transposed to (B, L, H, D) and made
contiguous, as transformers' SDPA path does; lowbit's kernel writes that layout directly. q, k, v are strided views
of one (B, L, 3, H, D) projection, as in a transformer; a boolean padding mask (B, 1, 1, L) where the batch has more
than one sequence. Shapes: MiniLM (12 heads of 32, 45 tokens at the workloads' batch 1 and 32), the digits ViT (4
heads of 16, 16 tokens), BERT-base (12 heads of 64) at 128 and 512 tokens.

    python benchmarks/attention.py --threads 1 2 --out benchmarks/results/attention-<cpu>.md
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from lowbit.kernels import native
from lowbit.kernels.attention import sdpa
from lowbit.measure.envinfo import _version, environment
from lowbit.measure.latency import compare_latency

SHAPES = [  # (name, B, H, L, D)
    ("MiniLM batch 1", 1, 12, 45, 32),
    ("MiniLM batch 32", 32, 12, 45, 32),
    ("digits ViT batch 1", 1, 4, 16, 16),
    ("digits ViT batch 32", 32, 4, 16, 16),
    ("BERT-base 128 tokens", 1, 12, 128, 64),
    ("BERT-base 512 tokens", 1, 12, 512, 64),
    ("BERT-base 128 tokens, batch 8", 8, 12, 128, 64),
]


def inputs(b: int, h: int, length: int, d: int) -> tuple[torch.Tensor, ...]:
    x = torch.randn(b, length, 3, h, d)
    q, k, v = (t.transpose(1, 2) for t in x.unbind(2))
    mask = None
    if b > 1:
        keep = torch.ones(b, 1, 1, length, dtype=torch.bool)
        for i in range(b):
            keep[i, ..., length - (i * 7) % max(1, length // 2) :] = i == 0  # varied padding, the first row none
        mask = keep
    return q, k, v, mask


def run(threads: int, repeats: int) -> list[dict]:
    rows = []
    for name, b, h, length, d in SHAPES:
        q, k, v, mask = inputs(b, h, length, d)

        def pytorch(q=q, k=k, v=v, mask=mask):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).contiguous()

        def lowbit(q=q, k=k, v=v, mask=mask):
            return sdpa(q, k, v, mask)

        err = (pytorch() - lowbit()).abs().max().item()
        with torch.no_grad():
            st = compare_latency({"pytorch": pytorch, "lowbit": lowbit}, repeats=repeats, threads=threads)
        t_pt, t_lb = st["pytorch"].median_ms * 1e3, st["lowbit"].median_ms * 1e3
        rows.append(dict(name=name, threads=threads, pytorch_us=t_pt, lowbit_us=t_lb, ratio=t_pt / t_lb, err=err))
        print(
            f"{name:<32} t={threads}  PyTorch {t_pt:9.1f} µs  lowbit {t_lb:9.1f} µs  {t_pt / t_lb:5.2f}×  "
            f"max |diff| {err:.1e}",
            flush=True,
        )
    return rows


def leave_import_path() -> None:
    """Takes this script's directory off the import path, where Python puts it first: its kernels.py would shadow
    the ``kernels`` package that transformers probes for (hub kernels) when MiniLM loads (an ImportError)."""
    here = Path(__file__).resolve().parent
    sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != here]


def main(argv: list[str] | None = None) -> int:
    leave_import_path()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    if not native.available():
        raise SystemExit(f"native kernels unavailable: {native.unavailable_reason()}")
    rows = [r for t in args.threads for r in run(t, args.repeats)]
    if args.out:
        env = environment()
        text = (
            f"CPU: {env['cpu']}; torch {env['torch']}; native kernels: {env['kernels']}; "
            f"onnxruntime {_version('onnxruntime')}\n\n"
            "| shape (B, H, L, D) | threads | PyTorch SDPA µs | lowbit µs | lowbit speed-up | max abs diff |\n"
            "|---|---|---|---|---|---|\n"
            + "\n".join(
                f"| {r['name']} | {r['threads']} | {r['pytorch_us']:.1f} | {r['lowbit_us']:.1f} | {r['ratio']:.2f}× | "
                f"{r['err']:.1e} |"
                for r in rows
            )
            + "\n"
        )
        path = Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
