"""The ``lowbit`` command line: demo, compress, inspect, eval, presets.

Example:
    $ lowbit demo                                    # every embedded workload through every preset
    $ lowbit compress minilm --recipe w4g128 --out minilm-w4
    $ lowbit inspect minilm-w4                        # per-layer table of a checkpoint
    $ lowbit eval minilm-w4                           # quality, size and latency vs the fp32 original
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from rich.console import Console

from lowbit.errors import LowbitError

EPILOG = """\
MODEL is one of: an embedded workload (digits-cnn, digits-vit, minilm; fmnist-cnn, fmnist-vit), a directory written by
`lowbit compress`, a Hugging Face model directory, or package.module:function returning an nn.Module.
RECIPE is a preset name (see `lowbit presets`) or a YAML file.

examples:
  lowbit demo                                   all workloads x all presets, report in lowbit-report/
  lowbit demo --workloads digits-cnn --recipes w8a8 w4g128
  lowbit demo --suite ptq                       GPTQ / AWQ / HQQ / SmoothQuant vs RTN, every workload
  lowbit demo --suite lowbit                    1-bit / ternary / 2-4 bit QAT grid on the digits models
  lowbit demo --suite lowbit --workloads fmnist-cnn fmnist-vit --epochs 5   the same on Fashion-MNIST
  lowbit compress minilm --recipe w4g128 --out minilm-w4
  lowbit inspect minilm --recipe w3g64          what a recipe would do to each layer
  lowbit eval minilm-w4                         quality, size, BitOPs, latency vs fp32
  lowbit eval minilm-w4 --compile               the same, both models under torch.compile
  (latency is of the packed model; transformers models in it run their attention on lowbit's fp32 kernel, their
   encoder blocks (BERT-style, DistilBERT, ViT; lowbit's own ViT) one fused forward each — one C call once every
   layer is on its kernel; a BERT/RoBERTa/DistilBERT encoder all its blocks in one call, a BERT model embeddings
   included — and
   weight-only layers with float inputs, FP4 included, an fp32 kernel on their codes from 8 rows on; weight-only
   convolutions their kernel on their patches, raced against the conv on the dequantized weight)

environment:
  LOWBIT_KERNELS=auto|native|reference|portable|avx2   kernel choice: measured per layer (default), always the
      native kernel, always the PyTorch reference, always native with the library built without SIMD, or measured
      with the library built without AVX-512 (the native kernels use AVX-512 VNNI where the CPU has it, else AVX2)
  LOWBIT_AMX=0|off                              keep many-row layers off AMX tiles (used by default where the CPU,
      compiler and Linux allow them: Intel Sapphire Rapids on; int8-activation and W1A1 layers: the same results, bit
      for bit; FP8 and weight-only layers with float inputs: the same up to fp32 summation order)
  LOWBIT_CACHE_DIR                              where trained models and compiled kernels are cached
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lowbit",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
        description="Make trained PyTorch models small and fast on CPUs: quantize (8 bits down to 1 bit), "
        "measure quality, size, BitOPs and latency against the original, and report.",
    )
    p.add_argument("--version", action="version", version=f"lowbit {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    d = sub.add_parser(
        "demo",
        help="run every embedded workload through the demo recipes and write a report",
        description="Compress each embedded workload with each recipe (RTN), measure quality, size, "
        "BitOPs and latency against fp32 in the same run, print one table per workload "
        "and write OUT/results.jsonl and OUT/pareto.png.",
    )
    d.add_argument("--workloads", nargs="+", metavar="NAME", help="workloads to run (default: all)")
    d.add_argument("--recipes", nargs="+", metavar="RECIPE", help="recipes to run (default: the suite's)")
    d.add_argument(
        "--suite",
        choices=["default", "ptq", "lowbit"],
        default="default",
        help="default: RTN at every preset; ptq: RTN/HQQ/GPTQ/AWQ at W4 g128, W3 g64, W2 g64 and "
        "RTN/SmoothQuant/GPTQ at W8A8, with calibration seconds; lowbit: BiBench-style QAT grid of "
        "binarizers/ternarizers x W1A32, W1A1, W1.58A8, W2A2, W4A4 (digits models unless --workloads)",
    )
    d.add_argument("--epochs", type=int, default=30, help="QAT epochs per cell of --suite lowbit (default: 30)")
    d.add_argument("--train-device", default="cpu", help="where --suite lowbit trains: cpu (default) or cuda (a GPU)")
    d.add_argument("--out", default="lowbit-report", help="report directory (default: lowbit-report)")
    d.add_argument("--threads", type=int, default=1, help="CPU threads for latency (default: 1)")
    d.add_argument("--repeats", type=int, default=20, help="timed repeats per model (default: 20)")
    d.add_argument("--batch-size", type=int, default=1, help="batch size for latency (default: 1)")

    c = sub.add_parser(
        "compress",
        help="compress a model with a recipe and save it",
        description="Compress MODEL with RECIPE and save safetensors + JSON to OUT (atomically).",
    )
    c.add_argument("model", metavar="MODEL")
    c.add_argument("--recipe", "-r", required=True, help="preset name or YAML file")
    c.add_argument("--out", "-o", required=True, help="output directory")
    c.add_argument("--data", help="for module:function models: module:function returning calibration/eval data")
    c.add_argument("--calibration-samples", type=int, default=128, help="calibration samples (default: 128)")

    i = sub.add_parser(
        "inspect",
        help="per-layer table: type, shape, params, MACs, format",
        description="Show every Linear/Conv layer of MODEL with its shape, parameters, MACs for one "
        "example input and its format (after --recipe, if given).",
    )
    i.add_argument("model", metavar="MODEL")
    i.add_argument("--recipe", "-r", help="show the formats this recipe would give each layer")
    i.add_argument("--data", help="for module:function models: module:function returning data")
    i.add_argument(
        "--packed",
        action="store_true",
        help="pack the model and show, per layer (convolutions included), the native kernel (marked '(panels)' "
        "where it ran its many-row layout), the path dispatch chose, its measured kernel and dense-path times, and "
        "the packed layer's whole call timed in alternation against an fp32 nn.Linear / nn.Conv2d of the same shape",
    )
    i.add_argument("--batch-size", type=int, default=1, help="batch size of the --packed timing (default: 1)")
    i.add_argument("--threads", type=int, default=1, help="CPU threads for the --packed timing (default: 1)")

    e = sub.add_parser(
        "eval",
        help="quality, size, BitOPs and latency of a model vs its fp32 original",
        description="Evaluate MODEL (optionally after compressing it with --recipe) against the fp32 "
        "original in the same run.",
    )
    e.add_argument("model", metavar="MODEL")
    e.add_argument("--recipe", "-r", help="compress with this recipe first")
    e.add_argument("--data", help="for module:function models: module:function returning data")
    e.add_argument("--threads", type=int, default=1)
    e.add_argument("--batch-size", type=int, default=1)
    e.add_argument(
        "--compile",
        action="store_true",
        help="time both models under torch.compile (packed layers keep lowbit's kernels; compiling takes seconds)",
    )
    e.add_argument("--json", action="store_true", help="print the result row as JSON")

    x = sub.add_parser(
        "export",
        help="write a compressed model as ONNX (int8 as QDQ, 4/2-bit as MatMulNBits)",
        description="Export MODEL (a checkpoint, or a workload compressed with --recipe) to ONNX. int8 weights "
        "become QDQ, int4/int2 groups, ternary and binary weights com.microsoft MatMulNBits; other formats are "
        "written dequantized with a warning. The exported file runs in ONNX Runtime.",
    )
    x.add_argument("model", metavar="MODEL")
    x.add_argument("--onnx", required=True, metavar="OUT", help="output .onnx file (written atomically)")
    x.add_argument("--recipe", "-r", help="compress with this recipe first")
    x.add_argument("--data", help="for module:function models: module:function returning data")
    x.add_argument("--opset", type=int, default=21, help="ONNX opset, 17–21 (default: 21)")
    x.add_argument(
        "--accuracy-level",
        type=int,
        default=0,
        choices=[0, 4],
        help="MatMulNBits accuracy_level: 0 computes in fp32 like lowbit, 4 accumulates in int8 (faster)",
    )
    x.add_argument("--batch-size", type=int, default=1, help="batch size of the example input (default: 1)")

    sub.add_parser("presets", help="list the named recipes and formats")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    console = Console(width=None if sys.stdout.isatty() else 220)
    try:
        from lowbit import commands

        return int(getattr(commands, f"cmd_{args.command}")(args, console) or 0)
    except LowbitError as exc:
        print(f"lowbit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lowbit: interrupted (no partial output was written)", file=sys.stderr)
        return 130


def _version() -> str:
    from lowbit import __version__

    return __version__


if __name__ == "__main__":
    raise SystemExit(main())
