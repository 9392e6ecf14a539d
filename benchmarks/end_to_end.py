"""End-to-end latency of the embedded workloads: fp32 PyTorch, lowbit packed formats, ONNX Runtime fp32 and
ONNX Runtime dynamic int8 (its best existing CPU int8 path), timed in alternation in one run.

lowbit's packed models run with shape-aware dispatch (``auto``): each layer uses its native kernel only where that
measured faster than the dense path. The fidelity column is the workload's metric measured on the packed model
itself, running the kernels it is timed with (query cosine to fp32 for MiniLM, logit cosine for the digits models).

    python benchmarks/end_to_end.py --workloads minilm --batch-sizes 1 32 --threads 1 2 \\
        --out benchmarks/results/end_to_end.md
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import lowbit
from lowbit.batches import run_model
from lowbit.measure.envinfo import _version, environment
from lowbit.measure.latency import compare_latency
from lowbit.nn.batchnorm_fold import fold_batchnorm
from lowbit.nn.fused_blocks import fuse_encoder_blocks
from lowbit.nn.hf_attention import use_lowbit_attention
from lowbit.zoo import get_workload

#: Presets; ``@int8`` packs with ``kernel_activations="int8"`` (weight-only layers take int8 inputs in the kernel);
#: ``@ort`` exports the compressed model with `lowbit.export.onnx.export_onnx` (``accuracy_level=4``: int4 / int2
#: weights as MatMulNBits with int8 accumulation) and runs it in ONNX Runtime; ``+compile`` runs the packed model
#: under ``torch.compile`` (the packed layers stay native kernels, as the custom op ``lowbit::packed_linear``; the
#: rest of the graph is fused by inductor). ``fp32+compile`` adds the fp32 model under ``torch.compile``;
#: ``fp32+lowbit-attention`` the fp32 model with lowbit's attention kernel (`lowbit.nn.hf_attention`, what
#: `lowbit.pack` applies by default; ``--attention keep`` packs without it), so the kernel's share is visible;
#: ``fp32+fused-blocks`` the fp32 model with that attention and fused encoder blocks (`lowbit.nn.fused_blocks`, also a
#: `lowbit.pack` default; ``--blocks keep`` packs without them): what lowbit's runtime gives without low bits.
#: ``fp32+fold-bn`` the fp32 model with its BatchNorms folded into the layers before them (what `lowbit.compress`
#: does before quantizing: the CNNs' packed rows include that gain).
FP32_ATTENTION = "fp32+lowbit-attention"
FP32_FUSED = "fp32+fused-blocks"
FP32_FOLDED = "fp32+fold-bn"
PRESETS = [
    "fp32+compile",
    FP32_ATTENTION,
    FP32_FUSED,
    FP32_FOLDED,
    "w8a8",
    "w8a8+compile",
    "w4g128-gptq",
    "w4g128-gptq@int8",
    "w4g128-gptq@int8+compile",
    "w4g128-gptq@ort",
    "w2g64-gptq@int8",
    "ternary",
    "w1a1",
    "w1a1+compile",
]


class OrtModule(torch.nn.Module):
    """An ONNX Runtime session behind a module's call, so a workload's ``evaluate`` can measure its fidelity."""

    def __init__(self, path: str, threads: int = 1) -> None:
        import onnxruntime as ort

        super().__init__()
        self.path = path
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        self.session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        self.names = [i.name for i in self.session.get_inputs()]

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        feed = dict(zip(self.names, args, strict=False)) | {k: v for k, v in kwargs.items() if k in self.names}
        return torch.from_numpy(self.session.run(None, {k: v.numpy() for k, v in feed.items()})[0])


def ort_runners(model: torch.nn.Module, batch: Any, threads: int, tmp: str) -> dict[str, Any]:
    """ONNX Runtime fp32 and dynamic-int8 sessions of the fp32 model (empty without onnxruntime)."""
    try:
        import onnxruntime as ort
        from onnxruntime.quantization import QuantType, quantize_dynamic

        from lowbit.export.onnx import export_onnx
    except ImportError:
        return {}
    fp32_path, int8_path = f"{tmp}/fp32.onnx", f"{tmp}/int8.onnx"
    export_onnx(model, batch, fp32_path)
    quantize_dynamic(fp32_path, int8_path, weight_type=QuantType.QInt8)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    feeds = {k: v.numpy() for k, v in batch.items()} if isinstance(batch, dict) else {"input": batch.numpy()}
    out: dict[str, Any] = {}
    for label, path in (("ORT fp32", fp32_path), ("ORT dynamic int8", int8_path)):
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        names = {i.name for i in sess.get_inputs()}
        feed = {k: v for k, v in feeds.items() if k in names}
        out[label] = lambda s=sess, f=feed: s.run(None, f)
    return out


def build_models(
    workload: str, presets: list[str], attention: str = "lowbit", blocks: str = "fused"
) -> tuple[dict[str, torch.nn.Module], dict[str, float]]:
    """fp32 and every packed preset of ``workload`` (compressed once), with each packed model's fidelity;
    ``attention`` / ``blocks``: `lowbit.pack`'s choices for the packed models' attention and encoder blocks."""
    wl = get_workload(workload)
    base = wl.build()
    calib = wl.calibration_batches(128)
    models: dict[str, torch.nn.Module] = {"fp32 PyTorch": base}
    quality: dict[str, float] = {"fp32 PyTorch": 1.0}
    key = "cosine" if workload == "minilm" else "logit_cosine"
    for spec in presets:
        if spec in (FP32_ATTENTION, FP32_FUSED, FP32_FOLDED):  # the runtime's share of a packed model's speed
            name = "fp32 PyTorch+" + spec.partition("+")[2]
            models[name] = copy.deepcopy(base).eval()
            if spec == FP32_FOLDED:
                fold_batchnorm(models[name])
            else:
                use_lowbit_attention(models[name])
            if spec == FP32_FUSED:
                fuse_encoder_blocks(models[name])
            with torch.no_grad():
                quality[name] = wl.evaluate(models[name])[key]
            continue
        spec_eager, plus, _ = spec.partition("+compile")
        if plus:  # the same model under torch.compile: same kernels, so the eager model's fidelity
            eager_name = "fp32 PyTorch" if spec_eager == "fp32" else f"lowbit {spec_eager}"
            if eager_name not in models:
                raise SystemExit(f"{spec}: list {spec_eager} before it in --presets")
            name = f"{eager_name}+compile"
            # Every compiled model (and thread count) recompiles the one shared `forward`: past dynamo's default
            # limit of 8 it would silently run eager.
            for limit in ("recompile_limit", "cache_size_limit"):
                if hasattr(torch._dynamo.config, limit):
                    setattr(torch._dynamo.config, limit, max(64, getattr(torch._dynamo.config, limit)))
            models[name] = torch.compile(models[eager_name])
            quality[name] = quality[eager_name]
            continue
        preset, _, how = spec.partition("@")
        q = lowbit.compress(base, preset, data=calib, progress=False)
        if how == "ort":
            from lowbit.export.onnx import export_onnx

            path = f"{tempfile.mkdtemp()}/{preset}.onnx"
            export_onnx(q, wl.example_batch(1), path, accuracy_level=4)
            runtime: torch.nn.Module = OrtModule(path)
        else:
            runtime = lowbit.pack(q, kernel_activations=how or "exact", attention=attention, blocks=blocks)
        with torch.no_grad():
            quality[f"lowbit {spec}"] = wl.evaluate(runtime)[key]  # the deployed model, on the kernels it runs
        models[f"lowbit {spec}"] = runtime
        print(f"{workload}: {spec} fidelity {quality[f'lowbit {spec}']:.4f}", flush=True)
    return models, quality


def bench(
    workload: str,
    models: dict[str, torch.nn.Module],
    quality: dict[str, float],
    batch_size: int,
    threads: int,
    repeats: int,
) -> list[dict[str, Any]]:
    torch.set_num_threads(threads)
    for m in models.values():
        if isinstance(m, OrtModule):
            m.__init__(m.path, threads)  # a session with this run's thread count
    batch = get_workload(workload).example_batch(batch_size)
    fns: dict[str, Any] = {}
    with torch.no_grad():
        for name, m in models.items():
            t0 = time.perf_counter()
            run_model(m, batch)  # dispatch measures each layer's kernels once per shape here (and compiles)
            if name.endswith("+compile"):
                print(f"{workload} b={batch_size} t={threads}: {name} compiled in {time.perf_counter() - t0:.1f} s")
            fns[name] = lambda m=m: run_model(m, batch)
    with tempfile.TemporaryDirectory() as tmp:
        fns.update(ort_runners(models["fp32 PyTorch"], batch, threads, tmp))
        with torch.no_grad():
            stats = compare_latency(fns, repeats=repeats, threads=threads, pause_s=0.02)
    fp32 = stats["fp32 PyTorch"].median_ms
    return [
        {
            "workload": workload,
            "batch": batch_size,
            "threads": threads,
            "path": name,
            "ms": st.median_ms,
            "speedup": fp32 / st.median_ms,
            "quality": quality.get(name, 1.0 if name == "ORT fp32" else None),
        }
        for name, st in stats.items()
    ]


def markdown(rows: list[dict[str, Any]]) -> str:
    env = environment()
    head = (
        f"CPU: {env['cpu']}; torch {env['torch']}; onnxruntime {_version('onnxruntime')}; "
        f"native kernels: {env.get('kernels')}\n\n"
        "| workload | batch | threads | path | ms | vs fp32 PyTorch | fidelity |\n|---|---|---|---|---|---|---|\n"
    )
    lines = [
        f"| {r['workload']} | {r['batch']} | {r['threads']} | {r['path']} | {r['ms']:.2f} | {r['speedup']:.2f}× | "
        + ("-" if r["quality"] is None else f"{r['quality']:.4f}")
        + " |"
        for r in rows
    ]
    return head + "\n".join(lines) + "\n"


def leave_import_path() -> None:
    """Takes this script's directory off the import path, where Python puts it first: its kernels.py would shadow
    the ``kernels`` package that transformers probes for (hub kernels) when MiniLM loads (an ImportError)."""
    here = Path(__file__).resolve().parent
    sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != here]


def main(argv: list[str] | None = None) -> int:
    leave_import_path()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", nargs="+", default=["digits-cnn", "digits-vit", "minilm"])
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 32])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--presets", nargs="+", default=PRESETS)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument(
        "--attention", choices=["lowbit", "keep"], default="lowbit", help="lowbit.pack's attention= for packed models"
    )
    ap.add_argument(
        "--blocks", choices=["fused", "keep"], default="fused", help="lowbit.pack's blocks= for packed models"
    )
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    rows: list[dict[str, Any]] = []
    for wl in args.workloads:
        models, quality = build_models(wl, args.presets, args.attention, args.blocks)
        for bs in args.batch_sizes:
            for threads in args.threads:
                for r in bench(wl, models, quality, bs, threads, args.repeats):
                    q = "" if r["quality"] is None else f"  fidelity {r['quality']:.4f}"
                    print(f"{wl:>10} b={bs:<3} t={threads} {r['path']:<30} {r['ms']:8.2f} ms {r['speedup']:5.2f}×{q}")
                    rows.append(r)
    if args.out:
        path = Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(markdown(rows))
        os.replace(tmp, path)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
