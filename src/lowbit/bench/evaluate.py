"""Measure one compressed model against its float original: quality, size, BitOPs, latency (same run).

Example:
    >>> from lowbit.bench.evaluate import measure_variant  # doctest: +SKIP
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lowbit.compress import compress
from lowbit.measure.envinfo import environment
from lowbit.measure.latency import compare_latency
from lowbit.measure.ops import count_ops
from lowbit.measure.size import model_size
from lowbit.recipe import Recipe, load_recipe
from lowbit.zoo import Workload, run_model


def deployed(model: nn.Module) -> tuple[nn.Module, str]:
    """What latency is measured on: the packed model (native kernels wherever dispatch finds them faster), or
    the model itself when it has no quantized weights or cannot be packed; with the kind of measurement."""
    from lowbit.nn.qlayers import QuantLayer
    from lowbit.pack import pack

    if not any(isinstance(m, QuantLayer) and m.weight_spec is not None for m in model.modules()):
        return model, "simulated" if any(isinstance(m, QuantLayer) for m in model.modules()) else "fp32"
    try:
        return pack(model), "packed"
    except Exception as exc:  # noqa: BLE001 - latency then comes from the simulated model, said in the row
        warnings.warn(f"lowbit: cannot pack this model ({exc}); its latency is of simulated layers", stacklevel=2)
        return model, "simulated"


def _runner(model: nn.Module, batch: Any) -> Callable[[], Any]:
    def run() -> Any:
        with torch.no_grad():
            return run_model(model, batch)

    return run


def measure_variant(
    workload: Workload,
    base: nn.Module,
    model: nn.Module,
    label: str,
    *,
    batch: Any,
    threads: int = 1,
    repeats: int = 20,
    fp32_quality: dict[str, float] | None = None,
    compress_seconds: float | None = None,
    compile: bool = False,
) -> dict[str, Any]:
    """One result row (the schema of ``results.jsonl``) for ``model`` measured against ``base``.

    ``compile``: time both models under ``torch.compile`` (compiled during the untimed warm-up; packed layers stay
    on lowbit's kernels, see `lowbit.kernels.dispatch`); the row's ``latency_kind`` then ends in ``+compile``."""
    quality = workload.evaluate(model)
    size, base_size = model_size(model), model_size(base)
    ops = count_ops(model, _runner(model, batch))
    runtime, kind = deployed(model) if label != "fp32" else (model, "fp32")
    timed_base = base
    if compile:
        timed_base = torch.compile(base)
        runtime = timed_base if runtime is base else torch.compile(runtime)  # the fp32 row: one compiled model
        kind += "+compile"
    lat = compare_latency(
        {"fp32": _runner(timed_base, batch), label: _runner(runtime, batch)}, threads=threads, repeats=repeats
    )
    row: dict[str, Any] = {
        "workload": workload.name,
        "recipe": label,
        "quality": {k: float(v) for k, v in quality.items()},
        "size_bytes": int(size.total_bytes),
        "fp32_size_bytes": int(base_size.total_bytes),
        "bits_per_weight": float(size.bits_per_weight),
        "macs": int(ops.total_macs),
        "bitops": int(ops.total_bitops),
        "latency_ms": float(lat[label].median_ms),
        "latency_p10_ms": float(lat[label].p10_ms),
        "latency_p90_ms": float(lat[label].p90_ms),
        "fp32_latency_ms": float(lat["fp32"].median_ms),
        "speedup": float(lat["fp32"].median_ms / max(lat[label].median_ms, 1e-9)),
        "batch_size": _batch_size(batch),
        "latency_kind": kind,
        "env": {**environment(), "threads": threads},  # the thread count latency was measured with
    }
    if fp32_quality is not None:
        row["fp32_quality"] = fp32_quality
    if compress_seconds is not None:
        row["compress_seconds"] = round(compress_seconds, 3)
    return row


def compress_and_measure(
    workload: Workload,
    base: nn.Module,
    recipe: str | Recipe,
    *,
    calib: list[Any] | None,
    batch: Any,
    threads: int = 1,
    repeats: int = 20,
    fp32_quality: dict[str, float] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Compress ``base`` with ``recipe`` and measure it (a row of the demo table)."""
    r = load_recipe(recipe)
    t0 = time.perf_counter()
    model = compress(base, r, data=calib, progress=progress)
    seconds = time.perf_counter() - t0
    return measure_variant(
        workload,
        base,
        model,
        r.name,
        batch=batch,
        threads=threads,
        repeats=repeats,
        fp32_quality=fp32_quality,
        compress_seconds=seconds,
    )


def _batch_size(batch: Any) -> int:
    t = next(iter(batch.values())) if isinstance(batch, dict) else batch
    return int(t.shape[0])
