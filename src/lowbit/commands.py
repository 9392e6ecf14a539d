"""Implementations of the CLI sub-commands (argument parsing lives in `lowbit.cli`)."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from rich.console import Console
from rich.table import Table

from lowbit.errors import ModelError


def cmd_demo(args: argparse.Namespace, console: Console) -> int:
    from lowbit.bench.demo import run_demo
    from lowbit.recipe import SUITES, load_recipe
    from lowbit.zoo import get_workload

    for name in args.workloads or []:
        get_workload(name)  # fail fast on a typo
    workloads = args.workloads
    if args.suite == "lowbit":
        from lowbit.bench.lowbit_suite import select_cells, suite_recipes

        recipes: list = select_cells(suite_recipes(epochs=args.epochs, device=args.train_device), args.recipes)
        workloads = workloads or ["digits-cnn", "digits-vit"]
    else:
        recipes = args.recipes or list(SUITES[args.suite])
        for r in recipes:
            load_recipe(r)
    run_demo(
        workloads,
        recipes,
        out_dir=args.out,
        threads=args.threads,
        repeats=args.repeats,
        batch_size=args.batch_size,
        console=console,
    )
    return 0


def cmd_compress(args: argparse.Namespace, console: Console) -> int:
    from lowbit.compress import compress, quant_layers
    from lowbit.io import save
    from lowbit.measure.size import model_size
    from lowbit.models import resolve
    from lowbit.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    res = resolve(args.model, args.data)
    if res.compressed:
        raise ModelError(f"'{args.model}' is already a compressed checkpoint: compress its source model instead")
    t0 = time.perf_counter()
    calib = res.workload.calibration_batches(args.calibration_samples)
    model = compress(res.model, recipe, data=calib)
    seconds = time.perf_counter() - t0
    save(model, args.out, source=res.source)
    size, base = model_size(model), model_size(res.model)
    console.print(
        f"compressed {args.model} with '{recipe.name}': {len(quant_layers(model))} layers quantized, "
        f"{base.total_bytes / 1e6:.2f} MB → {size.total_bytes / 1e6:.2f} MB, "
        f"{size.bits_per_weight:.2f} bits/weight, {seconds:.1f} s → {args.out}"
    )
    return 0


def cmd_export(args: argparse.Namespace, console: Console) -> int:
    from collections import Counter

    from lowbit.compress import compress
    from lowbit.export.onnx import export_onnx
    from lowbit.models import resolve
    from lowbit.recipe import load_recipe

    res = resolve(args.model, args.data)
    model = res.model
    if args.recipe:
        if res.compressed:
            raise ModelError(f"'{args.model}' is already a compressed checkpoint: drop --recipe or export its source")
        model = compress(model, load_recipe(args.recipe), data=res.workload.calibration_batches(128))
    report = export_onnx(
        model,
        res.workload.example_batch(args.batch_size),
        args.onnx,
        opset=args.opset,
        accuracy_level=args.accuracy_level,
    )
    paths = Counter(report.paths().values())
    console.print(
        f"{len(report.layers)} quantized layers ("
        + ", ".join(f"{n}× {p}" for p, n in paths.most_common())
        + f") → {args.onnx} ({report.bytes / 1e6:.2f} MB, opset {report.opset})"
    )
    for w in report.warnings:
        console.print(f"[yellow]warning:[/yellow] {w}")
    return 0


def cmd_inspect(args: argparse.Namespace, console: Console) -> int:
    import torch

    from lowbit.compress import compress
    from lowbit.measure.ops import count_ops
    from lowbit.models import resolve
    from lowbit.nn.qlayers import QuantLayer
    from lowbit.plan import quantizable_layers
    from lowbit.zoo import run_model

    res = resolve(args.model, args.data)
    model = res.model
    if args.recipe:
        model = compress(model, args.recipe, data=res.workload.calibration_batches(32), progress=False)
    batch = res.workload.example_batch(1)
    ops = count_ops(model, lambda: run_model(model, batch))
    macs = {layer.name: layer for layer in ops.per_layer}
    kernels = _packed_dispatch(model, res.workload, args) if getattr(args, "packed", False) else None
    if kernels is not None:
        model = kernels.pop("__model__")
        kernels_slower = kernels.pop("__slower__")
    table = Table(title=f"{args.model}" + (f" with {args.recipe}" if args.recipe else ""))
    columns = ["layer", "type", "shape", "params", "MACs", "format", "activations"]
    if kernels is not None:
        columns += ["kernel", "chosen", "kernel ms", "dense ms", "layer ms", "fp32 ms", "vs fp32"]
    for col in columns:
        table.add_column(col, justify="right" if col in ("params", "MACs") or col.endswith(("ms", "fp32")) else "left")
    names = [n for n, m in model.named_modules() if isinstance(m, QuantLayer)] + [
        n for n, _ in quantizable_layers(model)
    ]
    modules = dict(model.named_modules())
    for name in sorted(names, key=list(modules).index):
        m = modules[name]
        w = m.weight
        fmt = m.weight_spec.label() if isinstance(m, QuantLayer) and m.weight_spec else "fp32"
        act = m.act_spec.label() if isinstance(m, QuantLayer) and m.act_spec else "float"
        if getattr(m, "patch_tokens", False):
            act = act.replace("per-token", "per-patch")  # a conv's tokens are its patches (lowbit.nn.patches)
        row = [
            name,
            type(m).__name__,
            "×".join(map(str, w.shape)),
            f"{w.numel():,}",
            f"{macs[name].macs:,}" if name in macs else "-",
            fmt,
            act,
        ]
        if kernels is not None:
            row += kernels.get(name, ["-", "fp32", "-", "-", "-", "-", "-"])
        table.add_row(*row)
    console.print(table)
    if kernels is not None:
        from lowbit.kernels import native

        info = native.build_info()
        build = info["isa"] + ("+amx" if info["amx"] else "")
        state = f"native kernels: {build}" if native.available() else f"no native kernels ({info['reason']})"
        console.print(
            f"{state}; batch {args.batch_size}, {args.threads} thread(s). 'chosen' is the faster of the kernel and "
            "the dense reference path (fp32 matmul on the dequantized weight, after simulated activation "
            "quantization where the format has it), as dispatch measured them once per shape ('kernel ms', "
            "'dense ms'; a convolution with per-token activations runs them on its patches, one row per output "
            "position, and is timed on its whole calls: the kernel's one C call against cutting the patches, their "
            "dense product and the map; other convolutions have no native kernel; '(panels)': the kernel's "
            "many-row layout). "
            "'layer ms' is the packed layer's whole call and "
            "'fp32 ms' an nn.Linear / nn.Conv2d call of the same shape, timed in alternation on the layer's input "
            "(best of up to 300 rounds, ~0.1 s per layer); "
            "'vs fp32' is their ratio. "
            + (
                f"Slower than fp32: {', '.join(kernels_slower)}."
                if kernels_slower
                else "No packed layer is slower than fp32."
            )
            + _fused_note(model)
        )
    with torch.no_grad():
        total = sum(p.numel() for p in model.parameters())
    console.print(
        f"{len(names)} linear/conv layers; {ops.total_macs:,} MACs per example "
        f"({ops.other_macs:,} outside them); {total:,} float parameters"
    )
    return 0


def _fused_note(packed: Any) -> str:
    """A sentence on the packed model's fused encoder blocks (`lowbit.nn.fused_blocks`), or nothing."""
    from lowbit.nn.fused_blocks import fused_blocks

    blocks = fused_blocks(packed)
    if not blocks:
        return ""
    from lowbit.nn.fused_model import fused_models
    from lowbit.nn.fused_stack import stacked_encoders

    joint = sum(f.joint_qkv() for _, f in blocks)
    stacks, models = len(stacked_encoders(packed)), len(fused_models(packed))
    whole = f" {stacks} encoder(s) run all their blocks in one C call (lowbit.nn.fused_stack)" if stacks else ""
    whole += f", {models} model(s) the embeddings too (lowbit.nn.fused_model)" if models else ""
    return (
        f" {len(blocks)} encoder block(s) run fused ({blocks[0][1].layout.name} layout: lowbit.nn.fused_blocks), "
        f"{joint} of them with query / key / value as one layer (their rows above time each layer alone).{whole}"
        + ("." if whole else "")
    )


def _fp32_twin(layer: Any) -> Any:
    """An ``nn.Linear`` / ``nn.Conv2d`` with ``layer``'s dequantized weight and bias: the layer's cost in fp32."""
    from torch import nn

    from lowbit.nn.packed import PackedConv2d

    if isinstance(layer, PackedConv2d):
        twin: Any = nn.Conv2d(**layer.conv_args(), bias=layer.bias is not None)
    else:
        twin = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    twin.weight.data = layer.weight.detach().clone().reshape(twin.weight.shape)
    if layer.bias is not None:
        twin.bias.data = layer.bias.detach().clone()
    return twin


def _packed_dispatch(model: Any, workload: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Pack ``model``, run one batch so dispatch measures every layer, and return per-layer table cells: what
    dispatch measured (kernel and dense path) and the packed layer's whole call against an fp32 twin's, timed in
    alternation on the layer's own input."""
    import torch

    from lowbit.kernels.dispatch import layer_report, race
    from lowbit.nn.packed import PackedMixin
    from lowbit.pack import pack
    from lowbit.zoo import run_model

    packed = pack(model)
    torch.set_num_threads(args.threads)
    batch = workload.example_batch(args.batch_size)
    inputs: dict[str, torch.Tensor] = {}
    layers = {name: m for name, m in packed.named_modules() if isinstance(m, PackedMixin)}
    hooks = [m.register_forward_pre_hook(lambda _m, a, n=n: inputs.setdefault(n, a[0])) for n, m in layers.items()]
    with torch.no_grad():
        run_model(packed, batch)
        for h in hooks:
            h.remove()
        cells: dict[str, Any] = {"__model__": packed}
        slower: list[str] = []
        for name, m in layers.items():
            x = inputs[name]
            twin = _fp32_twin(m)
            # (more rounds than dispatch's own race: a 0.6 ms call got ~8 there, and its ratio moved by ±15 % per run)
            layer_ms, fp32_ms = race(lambda m=m, x=x: m(x), lambda t=twin, x=x: t(x), budget_s=0.1, max_rounds=300)
            if fp32_ms < layer_ms:
                slower.append(name)
            r = layer_report(m)[-1]
            measured = [f"{r[k]:.3f}" if r.get(k) is not None else "-" for k in ("native_ms", "dense_ms")]
            kernel = (r.get("kernel") or "-") + (" (panels)" if r.get("panels") else "")
            times = [f"{layer_ms:.3f}", f"{fp32_ms:.3f}", f"{fp32_ms / layer_ms:.2f}×"]
            cells[name] = [kernel, r["path"], *measured, *times]
    cells["__slower__"] = slower
    return cells


def cmd_eval(args: argparse.Namespace, console: Console) -> int:
    from lowbit.bench.evaluate import measure_variant
    from lowbit.compress import compress
    from lowbit.models import build_from_source, resolve
    from lowbit.recipe import load_recipe
    from lowbit.report.table import print_table

    res = resolve(args.model, args.data)
    base = build_from_source(res.source) if res.compressed else res.model
    model, label = res.model, ("checkpoint" if res.compressed else "fp32")
    if args.recipe:
        recipe = load_recipe(args.recipe)
        model = compress(res.model, recipe, data=res.workload.calibration_batches(128))
        label = recipe.name
    batch = res.workload.example_batch(args.batch_size)
    opts = {"batch": batch, "threads": args.threads, "compile": args.compile}
    rows = [measure_variant(res.workload, base, base, "fp32", **opts)]
    if model is not base:
        rows.append(measure_variant(res.workload, base, model, label, **opts))
    if args.json:
        print(json.dumps(rows[-1]))
    else:
        print_table(rows, title=f"{args.model}", metrics=list(rows[0]["quality"]), console=console)
    return 0


def cmd_presets(args: argparse.Namespace, console: Console) -> int:
    from lowbit.formats import ACT_FORMATS, FORMATS
    from lowbit.methods import available_methods
    from lowbit.recipe import PRESETS

    t = Table(title="recipes (use with --recipe; append -METHOD for another method, e.g. w4g128-rtn)")
    for col in ("preset", "weights", "activations", "description"):
        t.add_column(col)
    for name, r in PRESETS.items():
        s = r.stages[0]
        t.add_row(
            name,
            s.weights.label() if s.weights else "fp32",
            s.activations.label() if s.activations else "float",
            r.description,
        )
    console.print(t)
    f = Table(title="formats (use by name in recipe YAML)")
    f.add_column("name")
    f.add_column("format")
    for name, spec in {**FORMATS, **ACT_FORMATS}.items():
        f.add_row(name, spec.label())
    console.print(f)
    console.print(f"methods: {', '.join(available_methods())}")
    return 0
