"""Linear-layer speed of lowbit's packed formats against fp32 PyTorch and the best existing CPU paths.

Each contender runs a chain of L distinct layers of shape (M, K) × (K, N) whose weights together exceed
``--stream-mib`` (default: twice the largest cache the CPU reports, 96 to 256 MiB, within a memory budget; see
`default_stream_mib`), so weights stream from memory as in a real model; the
time per layer is the chain's time / L. Contenders are timed in alternation inside the same loop (median of
``--reps`` passes; each timed chain after a pause and ≥ ``WARM_S`` of untimed runs, steady state as in back-to-back
inference), and every row is reported as a ratio to fp32 PyTorch measured in that same run. Each (shape, threads)
pass also records the VM's steal time from ``/proc/stat`` (last column).

Contenders: fp32 ``torch.nn.functional.linear``; PyTorch's int8 dynamic quantization; ONNX Runtime (when
installed) dynamic int8 and ``MatMulNBits`` 4-/2-bit with int8 accumulation (accuracy_level 4); lowbit's packed
layers (``lowbit.pack``) forced onto their native kernel, the real product path including activation quantization
(int8 per token / signs) and Python overhead. A "memory read" row sums the fp32 chain without a matmul
(``torch.sum``): a reference for the streaming bandwidth at that thread count, not a strict ceiling (fp32's GEMV,
which prefetches, can stream faster); the "weights GB/s" column is weight bytes per layer / time.

    python benchmarks/kernels.py --threads 1 2 --out benchmarks/results/kernels.md
    python benchmarks/kernels.py --shapes 1x4096x4096 --formats w4g128 w1a1 --threads 1
    python benchmarks/kernels.py --shapes 1x4096x4096 --threads 1 2 --scaling   # 2 vs 1 thread, in alternation
    python benchmarks/kernels.py --shapes 1576x384x1536 --dispatch   # lowbit's layers as dispatch runs them

``--dispatch`` runs lowbit's layers in ``auto`` mode instead (every layer of a chain races its kernel against the
dense fp32 path on its first call and keeps the faster): what a packed model runs, with a column saying how many
layers of each chain took the kernel.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit.formats import ACT_FORMATS, FORMATS
from lowbit.kernels import native
from lowbit.kernels.dispatch import bucket, environment_mode, use_mode
from lowbit.measure.envinfo import _version, environment
from lowbit.recipe import Recipe, Stage

SHAPES = ["1x4096x4096", "16x4096x4096", "1x768x3072", "197x384x1536", "1576x384x1536"]
#: lowbit formats benchmarked: weights, activations.
FORMAT_ROWS: dict[str, tuple[str, str | None]] = {
    "w8 (w8a32)": ("int8", None),
    "w8a8": ("int8", "int8_token"),
    "w4g32": ("int4_g32", None),
    "w4g128": ("int4_g128", None),
    "w4g128a8": ("int4_g128", "int8_token"),
    "w2g64": ("int2_g64", None),
    "w2g64a8": ("int2_g64", "int8_token"),
    "ternary (W1.58A8)": ("ternary_absmean", "int8_token"),
    "binary (w1a32)": ("binary", None),
    "fp4 (e2m1 g32)": ("fp4_e2m1", None),
    "fp8": ("fp8_e4m3", None),  # E4M3 weights, fp32 activations
    "fp8a8": ("fp8_e4m3", "fp8_token"),  # E4M3 weights and dynamic per-token activations
    "w1a8": ("binary", "int8_token"),
    "w1a1": ("binary", "binary_token"),
}
Runner = Callable[[], None]
#: Pause before each contender: PyTorch's and ONNX Runtime's idle worker threads spin for a while after a call and
#: would steal the second core from whichever contender runs next (measured: lowbit's int8 kernels at 2 threads
#: ran 2× slower right after an ONNX Runtime session; with a 20 ms pause W1A1's 2-thread GEMV still ran at half
#: speed in session 6, hence 300 ms).
IDLE_S = float(os.environ.get("IDLE_S", 0.3))
#: After the pause every contender runs its chain untimed for at least this long, then once timed. On this VM a
#: vCPU left idle stays slow for a while after it wakes: a 2-thread ternary chain (0.40 ms a layer when busy) ran
#: at 0.55–0.64 ms in most timed runs that followed a pause and one untimed pass of 12 ms, and at 0.40 ms in every
#: run after 100 ms of untimed work (session 6, a throw-away script). The warm-up leaves the tail of the chain in
#: cache, but the timed run starts at its head and the chain is many times the L3: nothing it reads is still cached.
WARM_S = float(os.environ.get("WARM_S", 0.1))


def largest_cache_mib() -> int:
    """The largest CPU cache Linux reports for cpu0 (``/sys/.../cache/index*/size``), in MiB; 0 when unknown."""
    best = 0
    for size_file in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            text = size_file.read_text().strip().upper()
        except OSError:
            continue
        unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            best = max(best, int(digits) * unit)
    return best >> 20


def available_mib() -> int:
    """MemAvailable from ``/proc/meminfo`` in MiB (0 when unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) >> 10
    except (OSError, ValueError, IndexError):
        pass
    return 0


def default_stream_mib(n_formats: int) -> tuple[int, str]:
    """Chain size per contender: twice the largest cache, between 96 MiB (12× the L3 of the AMD hosts of sessions
    1-20) and 256 MiB. The Xeon of session 21 reports a 480 MiB L3, shared with the host's other tenants: a sum over
    chains of 24 / 96 / 256 / 640 / 1536 MiB read 27.0 / 14.2 / 13.1 / 12.9 / 13.0 GiB/s on one thread (a throw-away
    script), so from 256 MiB on a chain streams from memory there, and 2 × 480 MiB chains for every contender ran out
    of its 24 GB. Every contender holds its own chain, and ONNX Runtime's int8 model is built from an fp32 copy four
    times as large (serialised and quantized: about 12× the chain at the peak), so the size is capped at 60 % of the
    available memory over the contenders; a capped run says so, with the way out (fewer ``--formats`` per run).
    Returns (MiB, a line for the log)."""
    cache = largest_cache_mib()
    want = max(96, min(2 * cache, 256))
    avail = available_mib()
    cap = int(0.6 * avail / (n_formats + 20)) if avail else want
    if cap >= want:
        return want, f"chains of {want} MiB per contender (largest cache reported: {cache} MiB)"
    return max(cap, 96), (
        f"WARNING: chains of {max(cap, 96)} MiB per contender, below {want} MiB ({avail} MiB of memory for "
        f"{n_formats} formats): parts of a chain may be cached; bench fewer --formats per run"
    )


def lowbit_layers(k: int, n: int, weights: str, acts: str | None, count: int) -> list[nn.Module]:
    """``count`` independent packed copies of one (k → n) layer in the given formats."""
    torch.manual_seed(0)
    stage = Stage(method="rtn", weights=FORMATS[weights], activations=acts and ACT_FORMATS[acts], keep_first_last=False)
    packed = lowbit.pack(lowbit.compress(nn.Sequential(nn.Linear(k, n)), Recipe(stages=(stage,)), progress=False))
    return [copy.deepcopy(packed[0]) for _ in range(count)]


def lowbit_mode(how: str) -> contextlib.AbstractContextManager:
    """``native``: lowbit's layers always on their kernel (`use_mode`); ``auto``: as a packed model runs them by
    default, decided calls' short paths included (`environment_mode`: `use_mode` would turn those off)."""
    return environment_mode(how) if how == "auto" else use_mode(how)


def chain(count: int, fn: Callable[[int], object]) -> Runner:
    """Layers 0 .. count-1 one after another, each output dropped before the next layer runs (as in a model, where
    a layer's output is freed once the next one has read it): holding all of them would make every layer write
    into fresh pages, and at M = 1576 the page faults of a 9.7 MB output cost ~3 ms a layer on this VM."""

    def run() -> None:
        for i in range(count):
            fn(i)

    return run


def ort_runners(m: int, k: int, n: int, count: int, threads: int) -> dict[str, tuple[Runner, int]]:
    """ONNX Runtime contenders (empty when onnxruntime / onnx are not installed)."""
    try:
        import numpy as np
        import onnx
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError:
        return {}
    rng = np.random.default_rng(0)
    x = rng.standard_normal((m, k)).astype(np.float32)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    inp = helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])
    outs = [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [m, n]) for i in range(count)]

    def session(model: onnx.ModelProto) -> Runner:
        sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        return lambda: sess.run(None, {"x": x})

    result: dict[str, tuple[Runner, int]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        inits = [
            numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32) * 0.02, f"w{i}")
            for i in range(count)
        ]
        nodes = [helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"]) for i in range(count)]
        fp32 = helper.make_model(
            helper.make_graph(nodes, "fp32", [inp], outs, inits), opset_imports=[helper.make_opsetid("", 17)]
        )
        onnx.save(fp32, f"{tmp}/fp32.onnx")
        quantize_dynamic(f"{tmp}/fp32.onnx", f"{tmp}/int8.onnx", weight_type=QuantType.QInt8)
        result["ORT dynamic int8"] = (session(onnx.load(f"{tmp}/int8.onnx")), count)
    for bits, block in ((4, 32), (2, 64)):
        if k % block:
            continue
        nb = [
            helper.make_node(
                "MatMulNBits",
                ["x", f"b{i}", f"s{i}"],
                [f"y{i}"],
                domain="com.microsoft",
                K=k,
                N=n,
                bits=bits,
                block_size=block,
                accuracy_level=4,
            )
            for i in range(count)
        ]
        blob = k // block * block * bits // 8
        inits = []
        for i in range(count):
            inits.append(
                numpy_helper.from_array(
                    rng.integers(0, 256, (n, k // block, blob // (k // block)), dtype=np.uint8), f"b{i}"
                )
            )
            inits.append(numpy_helper.from_array((rng.random(n * (k // block)) * 0.01).astype(np.float32), f"s{i}"))
        model = helper.make_model(
            helper.make_graph(nb, "nbits", [inp], outs, inits),
            opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
        )
        try:
            result[f"ORT MatMulNBits {bits}-bit g{block} acc4"] = (session(model), count)
        except Exception as exc:  # an ORT build without this op or bit width
            print(f"  (ORT MatMulNBits {bits}-bit unavailable: {str(exc).splitlines()[0][:100]})")
    return result


def build_runners(
    m: int, k: int, n: int, formats: list[str], stream_mib: int, max_layers: int
) -> tuple[dict[str, tuple[Runner, int]], dict[str, float], int, dict[str, list[nn.Module]]]:
    """The thread-agnostic contenders of one shape (PyTorch and lowbit chains: they run on
    ``torch.get_num_threads()``), the weight bytes one layer of each reads, the chain length of int8 contenders
    (for ONNX Runtime's, built per thread count by `ort_runners`) and each lowbit contender's layers."""
    stream = stream_mib << 20

    def count_for(nbytes: float) -> int:
        return max(2, min(max_layers, int(-(-stream // max(nbytes, 1)))))

    x = torch.randn(m, k)
    runners: dict[str, tuple[Runner, int]] = {}
    lowbit_chains: dict[str, list[nn.Module]] = {}
    weight_bytes: dict[str, float] = {}  # bytes of weights (codes + scales) one layer of each contender reads
    n_fp = count_for(k * n * 4)
    ws = [torch.randn(n, k) * 0.02 for _ in range(n_fp)]
    runners["fp32 PyTorch"] = (chain(n_fp, lambda i: F.linear(x, ws[i])), n_fp)
    # What reading the same bytes costs with next to no arithmetic: a reference for this machine's streaming
    # bandwidth at this thread count (its "vs fp32" is not a layer's speed-up).
    runners["memory read (fp32 sum, no matmul)"] = (chain(n_fp, lambda i: ws[i].sum()), n_fp)
    weight_bytes["fp32 PyTorch"] = weight_bytes["memory read (fp32 sum, no matmul)"] = k * n * 4
    n_q = count_for(k * n)
    dq = [
        torch.ao.quantization.quantize_dynamic(nn.Sequential(nn.Linear(k, n)), {nn.Linear}, torch.qint8)
        for _ in range(n_q)
    ]
    runners["PyTorch dynamic int8"] = (chain(n_q, lambda i: dq[i](x)), n_q)
    weight_bytes["PyTorch dynamic int8"] = weight_bytes["ORT dynamic int8"] = k * n + n * 4
    for bits, block in ((4, 32), (2, 64)):
        weight_bytes[f"ORT MatMulNBits {bits}-bit g{block} acc4"] = k * n * bits / 8 + k // block * n * 4
    for name in formats:
        weights, acts = FORMAT_ROWS[name]
        bits = FORMATS[weights].effective_code_bits
        count = count_for(k * n * bits / 8)
        layers = lowbit_layers(k, n, weights, acts, count)
        runners[f"lowbit {name}"] = (chain(count, lambda i, layers=layers: layers[i](x)), count)
        weight_bytes[f"lowbit {name}"] = k * n * bits / 8
        lowbit_chains[f"lowbit {name}"] = layers
    return runners, weight_bytes, n_q, lowbit_chains


def dispatch_column(layers: list[nn.Module], rows: int, threads: int) -> str:
    """How many of a chain's layers dispatch ran on their kernel for ``rows`` on ``threads``, e.g. ``kernel
    512/512`` or ``dense 12/12`` (``auto`` mode: each layer decided by its own race)."""
    key = (bucket(rows), threads)
    native_count = sum(1 for layer in layers if layer._dispatch and layer._dispatch.choice.get(key, {}).get("native"))
    if native_count == len(layers):
        return f"kernel {native_count}/{len(layers)}"
    if native_count == 0:
        return f"dense {len(layers)}/{len(layers)}"
    return f"kernel {native_count}/{len(layers)}, dense {len(layers) - native_count}"


def with_ort(runners: dict[str, tuple[Runner, int]], ort: dict[str, tuple[Runner, int]]) -> dict:
    """The contenders in table order: PyTorch's, ONNX Runtime's, lowbit's."""
    others = {name: r for name, r in runners.items() if not name.startswith("lowbit")}
    return {**others, **ort, **{name: r for name, r in runners.items() if name.startswith("lowbit")}}


def time_once(run: Runner, count: int) -> float:
    """One timed chain after the pause and the untimed warm-up (see IDLE_S, WARM_S): seconds per layer."""
    time.sleep(IDLE_S)  # let the previous contender's spinning worker threads go idle
    warm_until = time.perf_counter() + WARM_S
    run()  # untimed, for at least WARM_S: wakes this contender's threads and the vCPUs (see WARM_S)
    while time.perf_counter() < warm_until:
        run()
    t0 = time.perf_counter()
    run()
    return (time.perf_counter() - t0) / count


def bench_shape(
    m: int,
    k: int,
    n: int,
    threads: int,
    formats: list[str],
    reps: int,
    stream_mib: int,
    max_layers: int = 512,
    how: str = "native",
) -> list[dict]:
    """Every contender of one shape at one thread count; ``how``: lowbit's dispatch mode (``native``: always the
    kernel; ``auto``: as dispatch decides, the ``dispatch`` field saying how many layers took the kernel)."""
    torch.set_num_threads(threads)
    runners, weight_bytes, n_q, lowbit_chains = build_runners(m, k, n, formats, stream_mib, max_layers)
    runners = with_ort(runners, ort_runners(m, k, n, n_q, threads))
    times: dict[str, list[float]] = {name: [] for name in runners}
    with torch.no_grad(), lowbit_mode(how):
        for run, _ in runners.values():
            run()  # warm-up: prepares kernel layouts, ORT allocations
        for _ in range(reps):
            for name, (run, count) in runners.items():
                times[name].append(time_once(run, count))
    fp32 = statistics.median(times["fp32 PyTorch"])
    auto = how == "auto"
    return [
        {
            "shape": f"{m}x{k}x{n}",
            "threads": threads,
            "path": name,
            "layers": runners[name][1],
            "ms": statistics.median(t) * 1e3,
            "speedup": fp32 / statistics.median(t),
            "gbps": weight_bytes.get(name, float("nan")) / statistics.median(t) / 1e9,
            "dispatch": dispatch_column(lowbit_chains[name], m, threads) if auto and name in lowbit_chains else "",
        }
        for name, t in times.items()
    ]


def thread_scaling(
    m: int,
    k: int,
    n: int,
    threads: list[int],
    formats: list[str],
    reps: int,
    stream_mib: int,
    max_layers: int = 512,
    how: str = "native",
) -> list[dict]:
    """Every contender at each thread count in alternation inside one loop (the same chains; ONNX Runtime one
    session per thread count), so a VM's slow and fast phases fall on both alike: per contender the median time at
    each count and the speed-up of the last count over the first."""
    torch.set_num_threads(threads[0])
    runners, _, n_q, _ = build_runners(m, k, n, formats, stream_mib, max_layers)
    per_threads = {t: with_ort(runners, ort_runners(m, k, n, n_q, t)) for t in threads}
    names = list(per_threads[threads[0]])
    times: dict[tuple[str, int], list[float]] = {(name, t): [] for name in names for t in threads}
    with torch.no_grad(), lowbit_mode(how):
        for t in threads:
            torch.set_num_threads(t)
            for run, _ in per_threads[t].values():
                run()  # warm-up
        for _ in range(reps):
            for name in names:
                for t in threads:
                    torch.set_num_threads(t)
                    run, count = per_threads[t][name]
                    times[(name, t)].append(time_once(run, count))
    rows = []
    for name in names:
        ms = {t: statistics.median(times[(name, t)]) * 1e3 for t in threads}
        rows.append({"shape": f"{m}x{k}x{n}", "path": name, "ms": ms, "scaling": ms[threads[0]] / ms[threads[-1]]})
    return rows


def scaling_markdown(rows: list[dict], threads: list[int], env: dict) -> str:
    head = (
        f"CPU: {env.get('cpu')}; torch {env.get('torch')}; onnxruntime {_version('onnxruntime')}; "
        f"native kernels: {env.get('kernels')}\n\n"
    )
    cols = " | ".join(f"ms / layer, {t} thread(s)" for t in threads)
    lines = [
        f"| shape (MxKxN) | path | {cols} | {threads[-1]} vs {threads[0]} thread(s) |",
        "|---|---|" + "---|" * len(threads) + "---|",
    ]
    for r in rows:
        times = " | ".join(f"{r['ms'][t]:.3f}" for t in threads)
        lines.append(f"| {r['shape']} | {r['path']} | {times} | {r['scaling']:.2f}× |")
    return head + "\n".join(lines) + "\n"


def cpu_jiffies() -> tuple[int, int] | None:
    """(steal, total) CPU time in jiffies since boot from ``/proc/stat`` (Linux), or None elsewhere. Steal is time
    this VM's vCPUs were ready but the host ran something else: a pass with a few percent of it is not comparable
    with one without."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])


def steal_percent(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float:
    if before is None or after is None or after[1] <= before[1]:
        return float("nan")
    return 100.0 * (after[0] - before[0]) / (after[1] - before[1])


def markdown(rows: list[dict], env: dict) -> str:
    head = (
        f"CPU: {env.get('cpu')}; torch {env.get('torch')}; onnxruntime {_version('onnxruntime')}; "
        f"native kernels: {env.get('kernels')}\n\n"
    )
    auto = any(r.get("dispatch") for r in rows)
    lines = [
        "| shape (MxKxN) | threads | path | layers in chain | ms / layer | vs fp32 | weights GB/s | VM steal % |"
        + (" dispatch chose |" if auto else ""),
        "|---|---|---|---|---|---|---|---|" + ("---|" if auto else ""),
    ]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['threads']} | {r['path']} | {r['layers']} | {r['ms']:.3f} | {r['speedup']:.2f}× "
            f"| {r['gbps']:.1f} | {r['steal']:.1f} |" + (f" {r.get('dispatch', '')} |" if auto else "")
        )
    return head + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=SHAPES)
    ap.add_argument("--formats", nargs="+", default=list(FORMAT_ROWS), choices=list(FORMAT_ROWS), metavar="FMT")
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument(
        "--stream-mib", type=int, default=None, help="weights per chain (default: 2x the largest cache, 96-256)"
    )
    ap.add_argument(
        "--max-layers", type=int, default=512, help="cap on the chain length (compute-bound large-M shapes)"
    )
    ap.add_argument("--out", help="write the markdown table here")
    ap.add_argument(
        "--scaling",
        action="store_true",
        help="time each contender at every --threads count in alternation and report the speed-up between them",
    )
    ap.add_argument(
        "--dispatch",
        action="store_true",
        help="run lowbit's layers as dispatch decides (auto: kernel or dense fp32 per layer), not always the kernel",
    )
    args = ap.parse_args(argv)
    if not native.available():
        print(f"native kernels unavailable: {native.unavailable_reason()}", file=sys.stderr)
    env = environment()
    if args.stream_mib is None:
        args.stream_mib, line = default_stream_mib(len(args.formats))
        print(line, flush=True)
    if args.scaling:
        return scaling_main(args, env)
    rows: list[dict] = []
    for shape in args.shapes:
        m, k, n = (int(v) for v in shape.split("x"))
        for threads in args.threads:
            before = cpu_jiffies()
            how = "auto" if args.dispatch else "native"
            new = bench_shape(m, k, n, threads, args.formats, args.reps, args.stream_mib, args.max_layers, how)
            steal = steal_percent(before, cpu_jiffies())
            print(f"{m}x{k}x{n} t={threads}: VM steal {steal:.1f} % of CPU time during this pass", flush=True)
            for r in new:
                r["steal"] = steal
                print(
                    f"{r['shape']:>14} t={threads} {r['path']:<34} {r['ms']:8.3f} ms  {r['speedup']:6.2f}×"
                    f"  {r['gbps']:5.1f} GB/s  {r['dispatch']}",
                    flush=True,
                )
            rows += new
            if args.out:  # rewritten after every shape, so an interrupted run keeps what it measured
                write_atomically(args.out, markdown(rows, env))
    if args.out:
        print(f"wrote {args.out}")
    return 0


def write_atomically(path_name: str, text: str) -> None:
    path = Path(path_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def scaling_main(args: argparse.Namespace, env: dict) -> int:
    threads = sorted(set(args.threads))
    if len(threads) < 2:
        print("--scaling needs two or more --threads counts", file=sys.stderr)
        return 2
    rows: list[dict] = []
    for shape in args.shapes:
        m, k, n = (int(v) for v in shape.split("x"))
        how = "auto" if args.dispatch else "native"
        for r in thread_scaling(m, k, n, threads, args.formats, args.reps, args.stream_mib, args.max_layers, how):
            times = "  ".join(f"{r['ms'][t]:8.3f} ms" for t in threads)
            print(f"{r['shape']:>14} {r['path']:<34} {times}  {r['scaling']:5.2f}×", flush=True)
            rows.append(r)
        if args.out:  # rewritten after every shape, so an interrupted run keeps what it measured
            write_atomically(args.out, scaling_markdown(rows, threads, env))
    if args.out:
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
