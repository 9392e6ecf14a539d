"""Run cells of ``lowbit demo --suite lowbit`` as parallel processes; print each cell as it ends.

Each cell is its own ``python -m lowbit demo --suite lowbit --recipes CELL`` process with ``--threads`` threads, so
on a machine with 16 cores eight 2-thread cells train at once, each under the same budget as on a 2-core machine.
The fp32 model is trained (and cached) once before the cells start. Rows are gathered from every cell's
``results.jsonl`` into ``OUT/results.jsonl`` with the seconds each cell took.

    python benchmarks/qat_grid.py --workload fmnist-cnn --epochs 8 --jobs 8 --threads 2 \\
        --cells lsq-W4A4 ternary-W1.58A8 bnn-W1A1 reste-W1A1 biper-W1A1 react-W1A1 --out qat-grid
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path


def run_cell(cell: str, args: argparse.Namespace) -> tuple[str, float, int]:
    out = Path(args.out) / cell
    out.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "lowbit", "demo", "--suite", "lowbit", "--workloads", args.workload,
        "--recipes", cell, "--epochs", str(args.epochs), "--threads", str(args.threads),
        "--repeats", "3", "--out", str(out), "--train-device", args.device,
    ]  # fmt: skip
    t0 = time.perf_counter()
    with open(out / "log.txt", "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=False).returncode
    return cell, time.perf_counter() - t0, rc


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", default="fmnist-cnn")
    p.add_argument("--cells", nargs="+", required=True)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="qat-grid")
    p.add_argument("--device", default="cpu", help="cpu, or cuda to train every cell on a GPU")
    args = p.parse_args()

    import torch

    from lowbit.zoo import get_workload

    torch.set_num_threads(max(args.threads, 1))
    wl = get_workload(args.workload)
    fp32 = wl.evaluate(wl.build())
    print(f"{args.workload} fp32: {fp32}", flush=True)
    rows = []
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(run_cell, c, args) for c in args.cells]
        for fut in as_completed(futures):  # report each cell as soon as it ends
            cell, secs, rc = fut.result()
            res = Path(args.out) / cell / "results.jsonl"
            row = [json.loads(line) for line in res.read_text().splitlines()][-1] if rc == 0 and res.exists() else {}
            q = row.get("quality", {})
            print(f"{cell:24s} rc={rc} {secs:7.0f} s  {q}", flush=True)
            rows.append({"cell": cell, "seconds": secs, "returncode": rc, "epochs": args.epochs, **row})
    Path(args.out).mkdir(parents=True, exist_ok=True)
    with open(Path(args.out) / "results.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    print(f"fp32 accuracy {fp32.get('accuracy', float('nan')):.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
