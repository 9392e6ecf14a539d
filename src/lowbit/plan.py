"""Decide which layers a recipe stage compresses and in which format (pure selection, no surgery).

Selection rules, in order: layer type (``nn.Linear`` / ``nn.Conv2d`` and subclasses, never already-quantized
layers), ``targets`` regexes, ``ignore`` regexes, then ``overrides`` (later wins). With ``keep_first_last`` the first
and last selected layers (in module registration order) keep 8-bit per-channel weights and float activations when
the stage's weights are below 8 bits. A regex that matches no layer is an error, since it is almost always a typo.

Example:
    >>> from torch import nn
    >>> from lowbit.recipe import get_preset
    >>> from lowbit.plan import build_plan
    >>> m = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 2))
    >>> [(p.name, p.weights.label()) for p in build_plan(m, get_preset("w4g128").stages[0])]
    [('0', 'int8 sym per-channel'), ('2', 'int4 asym g128'), ('3', 'int8 sym per-channel')]
"""

from __future__ import annotations

import re

from torch import nn

from lowbit.errors import RecipeError
from lowbit.formats.registry import FORMATS
from lowbit.methods.registry import LayerPlan
from lowbit.nn.qlayers import QuantLayer
from lowbit.recipe import Stage

#: Format the first / last layers fall back to when a stage goes below 8 bits.
EDGE_FORMAT = FORMATS["int8"]


def quantizable_layers(model: nn.Module, types: tuple[str, ...] = ("Linear", "Conv2d")) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every float Linear / Conv2d (subclasses included) in registration order."""
    classes = tuple({"Linear": nn.Linear, "Conv2d": nn.Conv2d}[t] for t in types)
    return [(n, m) for n, m in model.named_modules() if isinstance(m, classes) and not isinstance(m, QuantLayer)]


def _unmatched(patterns: tuple[str, ...] | list[str], names: list[str]) -> list[str]:
    return [p for p in patterns if not any(re.search(p, n) for n in names)]


def build_plan(model: nn.Module, stage: Stage, where: str = "stage") -> list[LayerPlan]:
    """The layers ``stage`` compresses, each with its weight and activation format."""
    layers = quantizable_layers(model, stage.types)
    names = [n for n, _ in layers]
    if not layers:
        raise RecipeError(f"{where}: the model has no {' / '.join(stage.types)} layers to compress")
    for kind, pats in (
        ("target", stage.targets),
        ("ignore", stage.ignore),
        ("override", tuple(o.pattern for o in stage.overrides)),
    ):
        bad = _unmatched(pats, names)
        if bad:
            preview = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
            raise RecipeError(f"{where}: {kind} regex '{bad[0]}' matches no layer (layers: {preview})")
    selected = [
        (n, m)
        for n, m in layers
        if any(re.search(p, n) for p in stage.targets) and not any(re.search(p, n) for p in stage.ignore)
    ]
    plan: list[LayerPlan] = []
    for i, (name, mod) in enumerate(selected):
        weights, acts = stage.weights, stage.activations
        edge = i in (0, len(selected) - 1) and len(selected) > 1
        if stage.keep_first_last and edge and weights is not None and weights.effective_code_bits < 8:
            weights, acts = EDGE_FORMAT, None
        skip = False
        for o in stage.overrides:
            if re.search(o.pattern, name):
                weights = o.weights if o.weights is not None else weights
                acts = o.activations if o.activations is not None else acts
                skip = o.skip
        if not skip:
            plan.append(LayerPlan(name, mod, weights, acts))
    return plan
