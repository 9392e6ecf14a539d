"""Layer-by-layer (sequential) calibration with eager forward hooks, one block's activations in memory at a time.

The model is split into *blocks*: the repeated layers of the longest ``nn.ModuleList`` (transformer layers), or,
when there is none, the whole model as one block. Inputs of the first block are captured once (a pre-hook stops
the forward there). For each block, its selected layers are processed in execution order, layers that read the
same input (q/k/v) together ("true-sequential"): the block is re-run on the stored inputs with hooks feeding each
layer's input to the method's collector, the method quantizes the group, the float layers are swapped for
quantized ones, and the next group sees the quantized outputs. The quantized block's outputs are the next block's
inputs. Layers outside the blocks (a conv stem, a classifier head) are calibrated with full-model passes.

Example:
    >>> from lowbit.calibration.sequential import find_blocks
    >>> from torch import nn
    >>> m = nn.Sequential(nn.Linear(4, 4), nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)]))
    >>> [name for name, _ in find_blocks(m)]
    ['1.0', '1.1']
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.batches import as_batches, run_model
from lowbit.calibration import estimate
from lowbit.errors import DataError
from lowbit.methods.registry import LayerPlan
from lowbit.nn.qlayers import QuantLayer


class Collector(Protocol):
    """Accumulates what a method needs from one layer's inputs (a Hessian, channel statistics, samples)."""

    def update(self, x: torch.Tensor) -> None: ...


class _StopForward(Exception):
    pass


@dataclass
class SequentialHooks:
    """What the engine needs from a method."""

    make_collector: Callable[[LayerPlan], Collector]
    #: Quantize a group of layers sharing an input; swaps them into the model through the callback it is given.
    quantize_group: Callable[[list[LayerPlan], dict[str, Collector]], None]
    #: (matrix flops, element-wise operations, tensor-operation calls) of quantizing one layer from ``tokens``
    #: calibration rows (`calibration.estimate`), for the time estimate printed before starting; None: rounding.
    solve_flops: Callable[[LayerPlan, int], tuple[float, float, float]] | None = None


def _has_layers(m: nn.Module) -> bool:
    return any(isinstance(c, (nn.Linear, nn.Conv2d, QuantLayer)) for c in m.modules())


def find_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The repeated blocks of the longest ``nn.ModuleList`` of same-type modules, else ``[("", model)]``."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) >= 2 and len({type(c) for c in m}) == 1 and _has_layers(m[0]):
            if best is None or len(m) > len(best[1]):
                best = (name, m)
    if best is None:
        return [("", model)]
    prefix = f"{best[0]}." if best[0] else ""
    return [(f"{prefix}{i}", child) for i, child in enumerate(best[1])]


def _inside(name: str, block: str) -> bool:
    return block == "" or name == block or name.startswith(block + ".")


def _execution_groups(
    run: Callable[[], Any], modules: dict[str, nn.Module], plan_names: Sequence[str]
) -> list[list[str]]:
    """Group layers by shared input tensor, in the order they execute during ``run()``."""
    order: list[tuple[str, int]] = []
    handles = []
    for name in plan_names:

        def hook(_m: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
            if all(n != name for n, _ in order):
                order.append((name, args[0].data_ptr() ^ hash(tuple(args[0].shape))))

        handles.append(modules[name].register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    keys: list[int] = []
    for name, key in order:
        if key in keys:
            groups[keys.index(key)].append(name)
        else:
            keys.append(key)
            groups.append([name])
    missing = [n for n in plan_names if all(n != o for o, _ in order)]
    if missing:
        raise DataError(
            f"layer '{missing[0]}' never ran on the calibration data, so it cannot be calibrated: check "
            "the data or ignore that layer in the recipe"
        )
    return groups


def estimate_memory_bytes(block_inputs: list[tuple[tuple[Any, ...], dict[str, Any]]], plan: list[LayerPlan]) -> int:
    """Peak memory estimate above the model itself: the stored block inputs and the next block's inputs, the
    transient activations of one batch inside a block (≈ 10× its input: MLP expansion, attention), and the widest
    layer's fp64 Hessian with the copies the collector and GPTQ's factorisation hold at once (≈ 8 × in² × 8 bytes:
    H, H + λI, its Cholesky factor, the inverse, its upper factor, temporaries). Checked on MiniLM GPTQ (128 / 512
    calibration glosses): measured peak growth 198–254 / 203–209 MiB against estimates of 182 / 207 MiB."""

    def size(obj: Any) -> int:
        if isinstance(obj, torch.Tensor):
            return obj.numel() * obj.element_size()
        if isinstance(obj, (list, tuple)):
            return sum(size(o) for o in obj)
        if isinstance(obj, dict):
            return sum(size(o) for o in obj.values())
        return 0

    per_batch = [size(a) + size(k) for a, k in block_inputs]
    widest = max((p.module.weight[0].numel() for p in plan), default=0)
    return 2 * sum(per_batch) + 10 * max(per_batch, default=0) + 8 * widest * widest * 8


def _max_rss_bytes() -> int:
    """The process's peak resident memory so far (0 where the platform does not report it)."""
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    except (ImportError, OSError):
        return 0


def _capture_block_inputs(
    model: nn.Module, block: nn.Module, batches: Sequence[Any]
) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
    captured: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        captured.append((args, kwargs))
        raise _StopForward

    h = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for b in batches:
                try:
                    run_model(model, b)
                except _StopForward:
                    pass
    finally:
        h.remove()
    return captured


def token_mask(batch: Any) -> torch.Tensor | None:
    """The ``attention_mask`` of a dict batch (padding positions are left out of calibration statistics)."""
    if isinstance(batch, dict) and isinstance(batch.get("attention_mask"), torch.Tensor):
        return batch["attention_mask"].bool()
    return None


def _real_tokens(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Rows of ``x`` at non-padding positions when ``x`` is ``(batch, tokens, features)`` and a mask fits it."""
    if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        return x[mask]
    return x


def _collect(
    run: Callable[[], Any], modules: dict[str, nn.Module], collectors: dict[str, Collector], current: dict[str, Any]
) -> None:
    """Run ``run()`` with hooks feeding each layer's (unpadded) input to its collector; each batch's forward stops
    as soon as every layer of the group has seen its input (the rest of the block is not needed)."""
    seen: set[str] = set()

    def hook(name: str, c: Collector, args: tuple[Any, ...]) -> None:
        c.update(_real_tokens(args[0].detach(), current.get("mask")))
        seen.add(name)
        if len(seen) == len(collectors):
            seen.clear()
            raise _StopForward

    handles = [
        modules[name].register_forward_pre_hook(lambda _m, args, name=name, c=c: hook(name, c, args))
        for name, c in collectors.items()
    ]
    current["stoppable"] = True
    try:
        with torch.no_grad():
            run()
    finally:
        current["stoppable"] = False
        for h in handles:
            h.remove()


def _call(fn: Callable[[], Any], current: dict[str, Any]) -> None:
    """Call one batch's forward, swallowing the early stop raised by `_collect`'s hooks."""
    try:
        fn()
    except _StopForward:
        if not current.get("stoppable"):
            raise


def run_sequential(
    model: nn.Module,
    plan: list[LayerPlan],
    batches: Sequence[Any],
    hooks: SequentialHooks,
    *,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict[str, float]:
    """Calibrate and quantize every layer of ``plan`` sequentially; returns timing figures.

    ``log`` receives the memory estimate printed before starting (default: ``print`` when ``progress``)."""
    log = log or (print if progress else (lambda _msg: None))
    batches = as_batches(batches)
    if not batches:
        raise DataError("sequential calibration needs at least one calibration batch")
    t_start = time.perf_counter()
    by_name = {p.name: p for p in plan}
    blocks = find_blocks(model)
    in_blocks = {b: [p.name for p in plan if _inside(p.name, b)] for b, _ in blocks}
    outside = [p.name for p in plan if not any(_inside(p.name, b) for b, _ in blocks)]

    def modules() -> dict[str, nn.Module]:
        return dict(model.named_modules())

    masks = [token_mask(b) for b in batches]
    current: dict[str, Any] = {}

    def full_pass() -> None:
        for b, mask in zip(batches, masks, strict=True):
            current["mask"] = mask
            _call(lambda b=b: run_model(model, b), current)

    def process(names: list[str], run: Callable[[], Any]) -> None:
        for group in _execution_groups(run, modules(), names):
            collectors = {n: hooks.make_collector(by_name[n]) for n in group}
            _collect(run, modules(), collectors, current)
            hooks.quantize_group([by_name[n] for n in group], collectors)

    # Layers executed before the first block (e.g. a conv stem) first, with full-model passes.
    first_block = blocks[0][1]
    pre, post = _split_outside(model, outside, first_block, batches[0])
    if pre:
        process(pre, full_pass)
    if blocks[0][0] == "":  # no repeated blocks: the whole model is the block, use full passes
        process(in_blocks[""], full_pass)
        return {"seconds": time.perf_counter() - t_start}
    inputs = _capture_block_inputs(model, first_block, batches)
    if not inputs:
        raise DataError("the calibration data never reached the model's first block")
    est = estimate_memory_bytes(inputs, plan)
    rss_before = _max_rss_bytes()
    est_s = _estimate_time(blocks, in_blocks, by_name, inputs, masks, hooks, modules(), current)
    log(
        f"sequential calibration: {len(blocks)} blocks, {len(plan)} layers, {len(batches)} batches; "
        f"estimated peak memory {est / 2**20:.0f} MiB, time ≈ {_seconds(est_s)}"
    )
    bar = tqdm(blocks, desc="calibrating blocks", disable=None if progress else True, leave=False)
    for bname, block in bar:
        names = in_blocks[bname]

        if names:
            process(names, _block_runner(block, inputs, masks, current))
        with torch.no_grad():
            new_inputs = []
            for args, kwargs in inputs:
                out = block(*args, **kwargs)
                hidden = out[0] if isinstance(out, (tuple, list)) else out
                new_inputs.append(((hidden, *args[1:]), kwargs))
            inputs = new_inputs
    if post:
        process(post, full_pass)
    growth = max(_max_rss_bytes() - rss_before, 0)
    log(
        f"sequential calibration done in {time.perf_counter() - t_start:.1f} s (estimate {_seconds(est_s)}); "
        f"peak memory grew by {growth / 2**20:.0f} MiB (estimate {est / 2**20:.0f} MiB)"
    )
    return {
        "seconds": time.perf_counter() - t_start,
        "estimated_seconds": est_s,
        "estimated_peak_bytes": float(est),
        "peak_growth_bytes": growth,
    }


def _block_runner(
    block: nn.Module,
    inputs: list[tuple[tuple[Any, ...], dict[str, Any]]],
    masks: list[torch.Tensor | None],
    current: dict[str, Any],
) -> Callable[[], None]:
    """A call running ``block`` on each stored input (its batch's mask in ``current``), early stops swallowed."""

    def run() -> None:
        for (args, kwargs), mask in zip(inputs, masks, strict=True):
            current["mask"] = mask
            _call(lambda a=args, k=kwargs: block(*a, **k), current)

    return run


def _estimate_time(
    blocks: list[tuple[str, nn.Module]],
    in_blocks: dict[str, list[str]],
    by_name: dict[str, LayerPlan],
    inputs: list[tuple[tuple[Any, ...], dict[str, Any]]],
    masks: list[torch.Tensor | None],
    hooks: SequentialHooks,
    modules: dict[str, nn.Module],
    current: dict[str, Any],
) -> float:
    """Seconds the blocks will take (`calibration.estimate`): one timed pass of the first block over the stored
    inputs (finding its execution groups), its layers' shapes and the method's solve cost. NaN where there is
    nothing to time (no planned layer in the first block, no calibration tokens)."""
    name, block = blocks[0]
    names = in_blocks[name]
    rows = [
        int(m.sum()) if m is not None else _rows(a[0] if a else None) for (a, _), m in zip(inputs, masks, strict=True)
    ]
    tokens = sum(rows)
    if not names or tokens <= 0:
        return float("nan")

    t0 = time.perf_counter()
    groups = _execution_groups(_block_runner(block, inputs, masks, current), modules, names)
    forward_s = time.perf_counter() - t0
    shapes = [(by_name[n].module.weight[0].numel(), by_name[n].module.weight.shape[0]) for n in names]
    solve = [
        hooks.solve_flops(by_name[n], tokens) if hooks.solve_flops else estimate.rtn_flops(k, n_out)
        for n, (k, n_out) in zip(names, shapes, strict=True)
    ]
    rest = estimate.estimate_seconds(
        blocks=len(blocks),
        passes=len(groups) + 2,  # the execution-order pass, one per group (they stop early), the next inputs
        forward_s=forward_s,
        solve=solve,
        forward_flops=estimate.forward_flops(shapes, tokens),
        elementwise_per_s=estimate.elementwise_rate(),
        call_s=estimate.call_overhead(),
    )
    return rest + forward_s  # (and this timed pass)


def _seconds(s: float) -> str:
    if s != s:  # NaN: nothing was timed
        return "?"
    return f"{s:.0f} s" if s >= 10 else f"{s:.1f} s"


def _rows(x: Any) -> int:
    """Rows of a block input tensor (0 for anything else)."""
    return int(x.numel() // x.shape[-1]) if isinstance(x, torch.Tensor) and x.dim() else 0


def _split_outside(
    model: nn.Module, outside: list[str], first_block: nn.Module, batch: Any
) -> tuple[list[str], list[str]]:
    """Split layers outside the blocks into those that run before the first block and those after it."""
    if not outside:
        return [], []
    mods = dict(model.named_modules())
    seen_block = [False]
    before: list[str] = []
    handles = [first_block.register_forward_pre_hook(lambda *_: seen_block.__setitem__(0, True))]
    for name in outside:
        handles.append(
            mods[name].register_forward_pre_hook(
                lambda _m, _a, name=name: None if seen_block[0] or name in before else before.append(name)
            )
        )
    try:
        with torch.no_grad():
            run_model(model, batch)
    finally:
        for h in handles:
            h.remove()
    return before, [n for n in outside if n not in before]
