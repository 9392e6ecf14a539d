"""Memory of packed models: the tensors their layers hold, and the process's resident memory around forwards.

Two measurements, each against the fp32 model:

- ``--held`` (default): a 384 → 1536 → 384 MLP packed in each ``--formats`` entry (``weights[/activations]``,
  names of `lowbit.formats`), called at each ``--rows`` count in ``auto`` dispatch; the bytes of every distinct
  tensor storage reachable from the packed model (buffers, parameters, caches, kernel layouts that dispatch keeps),
  over the fp32 weights' bytes.
- ``--rss``: twelve transformer-shaped blocks (qkv 384 → 1152, proj 384 → 384, fc1 384 → 1536, fc2 1536 → 384: 48
  layers), fp32 or packed with each ``--presets`` entry, each in a fresh process (``--runs`` times): resident memory
  (``/proc/self/statm``) at rest, then its growth after the first forward of ``--rows`` rows, after six, and after
  ``malloc_trim(0)`` (glibc: what the heap held free). Linux only.

    python benchmarks/memory.py --rows 1 64
    python benchmarks/memory.py --rss --presets fp32 w8a8 w4g128 --rows 1576 --runs 3
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import subprocess
import sys
from typing import Any

import torch
from torch import nn

import lowbit
from lowbit.formats import ACT_FORMATS, FORMATS
from lowbit.recipe import Recipe, Stage

HELD_FORMATS = ["int8/int8_token", "int4_g128", "int2_g64", "ternary_absmean/int8_token", "binary/binary_token"]


def storages(root: Any) -> dict[int, int]:
    """Bytes of each distinct tensor storage reachable from ``root`` through attributes, dicts, lists and tuples."""
    found: dict[int, int] = {}
    seen: set[int] = set()
    stack = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, (str, bytes, int, float, bool, type(None), type)):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            st = obj.untyped_storage()
            if st.data_ptr():
                found[st.data_ptr()] = st.nbytes()
            continue
        if isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple)):
            stack.extend(obj)
        elif hasattr(obj, "__dict__"):
            stack.extend(vars(obj).values())
    return found


def held(fmt: str, rows: list[int]) -> dict[str, float]:
    """Held bytes over the fp32 weights' bytes after calls at each row count (cumulative)."""
    weights, _, acts = fmt.partition("/")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(384, 1536), nn.ReLU(), nn.Linear(1536, 384)).eval()
    fp32 = sum(p.numel() * 4 for p in model.parameters())
    stage = Stage(
        method="rtn", weights=FORMATS[weights], activations=ACT_FORMATS[acts] if acts else None, keep_first_last=False
    )
    packed = lowbit.pack(lowbit.compress(model, Recipe(stages=(stage,)), progress=False))
    out = {}
    with torch.no_grad():
        for r in rows:
            for _ in range(3):
                packed(torch.randn(r, 384))
            out[f"{r} rows"] = sum(storages(packed).values()) / fp32
    return out


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.proj = nn.Linear(384, 1152), nn.Linear(384, 384)
        self.fc1, self.fc2 = nn.Linear(384, 1536), nn.Linear(1536, 384)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.proj(self.qkv(x)[..., :384])
        return x + self.fc2(torch.relu(self.fc1(x)))


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def rss_child(preset: str, rows: int) -> dict[str, float]:
    """One process's figures (run by ``--rss`` in a fresh interpreter per preset and run)."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = nn.Sequential(*[Block() for _ in range(12)]).eval()
    if preset != "fp32":
        model = lowbit.pack(lowbit.compress(model, preset, data=[torch.randn(8, 384)], progress=False))
    trim = ctypes.CDLL(None).malloc_trim
    gc.collect()
    trim(0)
    rest = rss_mib()
    x = torch.randn(rows, 384)
    with torch.no_grad():
        model(x)
        first = rss_mib() - rest
        for _ in range(5):
            model(x)
    gc.collect()
    six = rss_mib() - rest
    trim(0)
    return {"rest": rest, "first": first, "six": six, "trimmed": rss_mib() - rest}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rss", action="store_true", help="process resident memory instead of held tensors")
    ap.add_argument("--formats", nargs="+", default=HELD_FORMATS, help="weights[/activations] (--held)")
    ap.add_argument("--presets", nargs="+", default=["fp32", "w8a8", "w4g128"], help="fp32 or presets (--rss)")
    ap.add_argument("--rows", nargs="+", type=int, default=[1, 64])
    ap.add_argument("--runs", type=int, default=3, help="fresh processes per preset (--rss)")
    ap.add_argument("--child", nargs=2, metavar=("PRESET", "ROWS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(rss_child(args.child[0], int(args.child[1]))))
        return 0
    if not args.rss:
        print("| format | " + " | ".join(f"held / fp32 weights, after {r} rows" for r in args.rows) + " |")
        print("|---|" + "---|" * len(args.rows))
        for fmt in args.formats:
            h = held(fmt, args.rows)
            print(f"| {fmt} | " + " | ".join(f"{v:.2f}" for v in h.values()) + " |", flush=True)
        return 0
    rows = args.rows[0]
    print(f"| model ({rows} rows) | at rest MiB | first forward | six forwards | after malloc_trim |")
    print("|---|---|---|---|---|")
    for preset in args.presets:
        runs = []
        for _ in range(args.runs):
            cmd = [sys.executable, __file__, "--child", preset, str(rows)]
            runs.append(json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout))

        def span(key: str, runs: list[dict] = runs) -> str:
            lo, hi = min(r[key] for r in runs), max(r[key] for r in runs)
            return f"+{lo:.0f}" if round(lo) == round(hi) else f"+{lo:.0f}–{hi:.0f}"

        rest = sorted(r["rest"] for r in runs)[len(runs) // 2]
        print(f"| {preset} | {rest:.0f} | {span('first')} | {span('six')} | {span('trimmed')} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
