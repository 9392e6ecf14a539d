"""`compress(model, recipe, data)`: the one entry point that applies a recipe to a model.

First fold eval-mode BatchNorms into the convolutions feeding them (`lowbit.nn.batchnorm_fold`; the recipe's
``fold_batchnorm``). Then for each stage: select layers (`lowbit.plan`), let the stage's method compute quantized
weights, swap each selected layer for a `QuantLinear` / `QuantConv2d` holding codes and scales, then calibrate static
activation quantizers on ``data``. The input model is left untouched (a deep copy is compressed) unless
``inplace=True``.

Example:
    >>> import torch
    >>> from torch import nn
    >>> import lowbit
    >>> model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    >>> q = lowbit.compress(model, "w4g128")
    >>> type(q[2]).__name__, q[2].weight_spec.label()
    ('QuantLinear', 'int4 asym g128')
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.batches import as_batches
from lowbit.calibration.static import calibrate_activations
from lowbit.errors import DataError, ModelError
from lowbit.methods.registry import LayerPlan, MethodContext, get_method
from lowbit.nn.batchnorm_fold import fold_batchnorm
from lowbit.nn.qlayers import QuantConv2d, QuantLayer, QuantLinear
from lowbit.plan import build_plan
from lowbit.recipe import Recipe, load_recipe


def compress(
    model: nn.Module,
    recipe: str | Path | Recipe | dict[str, Any],
    data: Iterable[Any] | None = None,
    *,
    inplace: bool = False,
    progress: bool = True,
) -> nn.Module:
    """Compress ``model`` with ``recipe`` (preset name, YAML path, dict or `Recipe`); ``data`` = calibration batches.

    Batches are tensors (called as ``model(x)``) or dicts of tensors (``model(**x)``).
    """
    recipe = load_recipe(recipe)
    if not isinstance(model, nn.Module):
        raise ModelError(f"expected a torch.nn.Module, got {type(model).__name__}")
    check_finite_weights(model)
    batches = _materialize(data)
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    if recipe.fold_batchnorm:
        folded = fold_batchnorm(model)
        if folded:
            model.lowbit_folded_batchnorm = {**getattr(model, "lowbit_folded_batchnorm", {}), **folded}
    for i, stage in enumerate(recipe.stages):
        where = f"stage {i + 1} ({stage.method})"
        method = get_method(stage.method)
        method.check_options(stage.options)
        plan = build_plan(model, stage, where)
        if method.needs_data and not batches:
            raise DataError(f"{where} needs calibration data: pass data= (a list of input batches) to compress")
        swapped: set[str] = set()

        def swap(
            p: LayerPlan,
            qt: Any,
            input_scale: torch.Tensor | None = None,
            stage: Any = stage,
            swapped: set[str] = swapped,
        ) -> QuantLayer:
            new = swap_layer(model, p, qt, stage, input_scale)
            if new.act is not None and not new.act.calibrated:
                new.act.observing = True  # float pass-through until calibrate_activations below
            swapped.add(p.name)
            return new

        ctx = MethodContext(batches, dict(stage.options), progress, swap)
        qweights = method.quantize_layers(model, plan, ctx)
        for p in plan:  # layers the method neither swapped nor replaced itself (e.g. by QAT layers)
            if p.name not in swapped and model.get_submodule(p.name) is p.module:
                swap_layer(model, p, qweights.get(p.name), stage)
        calibrate_activations(model, as_batches(batches), progress=progress)
    model.lowbit_recipe = recipe  # type: ignore[assignment]
    return model


def check_finite_weights(model: nn.Module) -> None:
    """Refuse a model whose parameters contain NaN or Inf, naming the first such tensor."""
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise ModelError(f"parameter '{name}' contains NaN or Inf: fix or retrain the model before compressing")


def _materialize(data: Iterable[Any] | dict[str, Any] | None) -> Any:
    """Validate calibration data: a list of batches, or ``{"inputs": ..., "labels": ...}`` for training."""
    if data is None:
        return None
    if isinstance(data, dict) and "inputs" in data:
        inputs = data["inputs"]
        n = next(iter(inputs.values())).shape[0] if isinstance(inputs, dict) else len(inputs)
        if n == 0:
            raise DataError("training data is empty: pass at least one example")
        _check_finite([inputs])
        return data
    batches = list(data)
    if not batches:
        raise DataError("calibration data is empty: pass at least one input batch")
    _check_finite(batches)
    return batches


def _check_finite(batches: list[Any]) -> None:
    for b in batches:
        tensors = b.values() if isinstance(b, dict) else (b if isinstance(b, (list, tuple)) else [b])
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all():
                raise DataError("calibration data contains NaN or Inf values: clean the inputs")


def swap_layer(
    model: nn.Module, p: LayerPlan, qt: Any, stage: Any, input_scale: torch.Tensor | None = None
) -> QuantLayer:
    """Replace the float layer ``p.name`` by its quantized stand-in and return the new module."""
    if p.weights is not None and qt is None:
        raise ModelError(f"method produced no quantized weight for layer '{p.name}'")
    act_options = {"calibrator": stage.calibrator, "percentile": stage.percentile}
    if isinstance(p.module, nn.Conv2d):
        new: QuantLayer = QuantConv2d.from_float(p.module, qt, p.activations, **act_options)
    elif isinstance(p.module, nn.Linear):
        new = QuantLinear.from_float(p.module, qt, p.activations, **act_options)
    else:
        raise ModelError(
            f"layer '{p.name}' of type {type(p.module).__name__} is not supported: "
            "lowbit replaces nn.Linear and nn.Conv2d"
        )
    if input_scale is not None:
        new.set_input_scale(input_scale)
    set_submodule(model, p.name, new)
    return new


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted path ``name``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def quant_layers(model: nn.Module) -> Sequence[tuple[str, QuantLayer]]:
    """``(name, layer)`` of every quantized layer of a compressed model."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLayer)]
