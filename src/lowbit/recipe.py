"""Typed, versioned recipes: a list of stages, each a method applied to a selection of layers.

A recipe is data (YAML or a Python object): which method quantizes the weights (``rtn`` now; GPTQ, AWQ, ...
register more), in which `QuantSpec` format, what happens to activations, and which layers it touches (module-name
regexes and types, plus per-layer overrides). By default the first and last quantizable layers keep 8-bit weights
(``keep_first_last``), and embeddings are never replaced.

Example:
    >>> from lowbit.recipe import Recipe, get_preset
    >>> r = get_preset("w4g128")
    >>> r.stages[0].weights.label()
    'int4 asym g128'
    >>> Recipe.from_yaml(r.to_yaml()) == r
    True
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from lowbit.errors import RecipeError
from lowbit.formats.registry import ACT_FORMATS, FORMATS
from lowbit.formats.spec import QuantSpec, suggest

RECIPE_VERSION = 1
LAYER_TYPES: tuple[str, ...] = ("Linear", "Conv2d")
CALIBRATORS: tuple[str, ...] = ("minmax", "percentile", "mse")


def _spec(value: Any, where: str) -> QuantSpec | None:
    """A format given as a registry name, a dict of fields, a QuantSpec or None."""
    if value is None or isinstance(value, QuantSpec):
        return value
    if isinstance(value, str):
        table = {**FORMATS, **ACT_FORMATS}
        if value not in table:
            raise RecipeError(f"{where}: unknown format '{value}'{suggest(value, list(table))}")
        return table[value]
    return QuantSpec.from_dict(value, where=where)


def _regexes(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    items = [value] if isinstance(value, str) else list(value)
    for pattern in items:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise RecipeError(f"{where}: invalid regex '{pattern}': {exc}") from None
    return items


def _check_keys(data: dict[str, Any], cls: type, where: str) -> None:
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: expected a mapping, got {type(data).__name__}")
    names = [f.name for f in fields(cls)]
    for key in data:
        if key not in names:
            raise RecipeError(f"{where}: unknown key '{key}'{suggest(str(key), names)}; valid keys: {', '.join(names)}")


def _flag(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise RecipeError(f"{where}: expected true or false, got {value!r}")
    return value


@dataclass(frozen=True)
class Override:
    """Per-layer exception inside a stage: layers whose name matches ``pattern`` get these formats (or are skipped)."""

    pattern: str
    weights: QuantSpec | None = None
    activations: QuantSpec | None = None
    skip: bool = False

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> Override:
        _check_keys(data, cls, where)
        if "pattern" not in data:
            raise RecipeError(f"{where}: an override needs a 'pattern' (module-name regex)")
        return cls(
            pattern=_regexes(data["pattern"], where)[0],
            weights=_spec(data.get("weights"), f"{where}.weights"),
            activations=_spec(data.get("activations"), f"{where}.activations"),
            skip=bool(data.get("skip", False)),
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"pattern": self.pattern}
        if self.weights is not None:
            out["weights"] = self.weights.to_dict()
        if self.activations is not None:
            out["activations"] = self.activations.to_dict()
        if self.skip:
            out["skip"] = True
        return out


@dataclass(frozen=True)
class Stage:
    """One step of a recipe.

    Attributes:
        method: registered method name (``lowbit.methods.available_methods()``), e.g. ``rtn``.
        weights: weight format, or None to keep weights in fp32.
        activations: input-activation format (dynamic per-token, or static calibrated), or None for float.
        targets: module-name regexes (``re.search``) of layers to compress; default every layer.
        ignore: module-name regexes of layers to leave alone.
        types: layer types to compress (``Linear``, ``Conv2d``; subclasses included).
        keep_first_last: the first and last selected layers keep ≥ 8-bit weights and float activations.
        calibrator: static activation range estimator: ``minmax``, ``percentile`` or ``mse``.
        percentile: the percentile used by the ``percentile`` calibrator.
        overrides: per-layer formats (later overrides win).
        options: method-specific settings (see each method's docstring).
    """

    method: str = "rtn"
    weights: QuantSpec | None = None
    activations: QuantSpec | None = None
    targets: tuple[str, ...] = (".*",)
    ignore: tuple[str, ...] = ()
    types: tuple[str, ...] = LAYER_TYPES
    keep_first_last: bool = True
    calibrator: str = "percentile"
    percentile: float = 99.99
    overrides: tuple[Override, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from lowbit.methods.registry import available_methods  # local: methods import recipe types

        if self.method not in available_methods():
            raise RecipeError(
                f"unknown method '{self.method}'{suggest(self.method, available_methods())}; "
                f"available: {', '.join(available_methods())}"
            )
        for t in self.types:
            if t not in LAYER_TYPES:
                raise RecipeError(f"unknown layer type '{t}'{suggest(t, LAYER_TYPES)}; use {', '.join(LAYER_TYPES)}")
        if self.calibrator not in CALIBRATORS:
            raise RecipeError(
                f"unknown calibrator '{self.calibrator}'{suggest(self.calibrator, CALIBRATORS)}; "
                f"use {', '.join(CALIBRATORS)}"
            )
        if not 50.0 <= float(self.percentile) <= 100.0:
            raise RecipeError(f"percentile={self.percentile} must be between 50 and 100")
        if self.weights is None and self.activations is None:
            raise RecipeError(f"stage '{self.method}' quantizes nothing: give 'weights' and/or 'activations'")

    def __hash__(self) -> int:  # options is a dict; stages are compared by value
        return hash((self.method, self.weights, self.activations, self.targets, self.ignore))

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "stage") -> Stage:
        _check_keys(data, cls, where)
        kw: dict[str, Any] = dict(data)
        kw["weights"] = _spec(data.get("weights"), f"{where}.weights")
        kw["activations"] = _spec(data.get("activations"), f"{where}.activations")
        for key in ("targets", "ignore"):
            if key in data:
                kw[key] = tuple(_regexes(data[key], f"{where}.{key}"))
        if "types" in data:
            kw["types"] = tuple([data["types"]] if isinstance(data["types"], str) else data["types"])
        kw["overrides"] = tuple(
            Override.from_dict(o, f"{where}.overrides[{i}]") for i, o in enumerate(data.get("overrides") or [])
        )
        if not isinstance(kw.get("options", {}), dict):
            raise RecipeError(f"{where}.options must be a mapping")
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.method}
        if self.weights is not None:
            out["weights"] = self.weights.to_dict()
        if self.activations is not None:
            out["activations"] = self.activations.to_dict()
        defaults = Stage(method="rtn", weights=FORMATS["int8"])
        for key in ("targets", "ignore", "types", "keep_first_last", "calibrator", "percentile"):
            value = getattr(self, key)
            if value != getattr(defaults, key):
                out[key] = list(value) if isinstance(value, tuple) else value
        if self.overrides:
            out["overrides"] = [o.to_dict() for o in self.overrides]
        if self.options:
            out["options"] = dict(self.options)
        return out


@dataclass(frozen=True)
class Recipe:
    """A named, versioned list of stages.

    ``fold_batchnorm`` (default on): before the first stage, fold each eval-mode BatchNorm into the convolution
    feeding it (`lowbit.nn.batchnorm_fold`), so the folded weights are the ones quantized and run.
    """

    stages: tuple[Stage, ...]
    name: str = "custom"
    description: str = ""
    version: int = RECIPE_VERSION
    fold_batchnorm: bool = True

    def __post_init__(self) -> None:
        if self.version != RECIPE_VERSION:
            raise RecipeError(
                f"recipe version {self.version} is not supported (this lowbit reads version {RECIPE_VERSION})"
            )
        if not self.stages:
            raise RecipeError("recipe has no stages: add at least one under 'stages'")

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "recipe") -> Recipe:
        _check_keys(data, cls, where)
        stages = data.get("stages")
        if not isinstance(stages, list) or not stages:
            raise RecipeError(f"{where}: 'stages' must be a non-empty list of stages")
        return cls(
            stages=tuple(Stage.from_dict(s, f"{where}.stages[{i}]") for i, s in enumerate(stages)),
            name=str(data.get("name", "custom")),
            description=str(data.get("description", "")),
            version=int(data.get("version", RECIPE_VERSION)),
            fold_batchnorm=_flag(data.get("fold_batchnorm", True), f"{where}.fold_batchnorm"),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "name": self.name,
            "description": self.description,
            "stages": [s.to_dict() for s in self.stages],
            **({} if self.fold_batchnorm else {"fold_batchnorm": False}),
        }

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str, where: str = "recipe") -> Recipe:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise RecipeError(f"{where}: not valid YAML ({str(exc).splitlines()[0]})") from None
        return cls.from_dict(data, where)

    def label(self) -> str:
        return self.name


def _preset(
    name: str, description: str, weights: str | None, activations: str | None = None, method: str = "rtn", **stage: Any
) -> Recipe:
    return Recipe(
        name=name,
        description=description,
        stages=(Stage(method=method, weights=_spec(weights, name), activations=_spec(activations, name), **stage),),
    )


#: Named presets (RTN). Methods that beat RTN add ``<preset>-<method>`` variants, e.g. ``w3g64-gptq``.
PRESETS: dict[str, Recipe] = {
    r.name: r
    for r in (
        _preset("w8a8", "int8 per-channel weights, int8 dynamic per-token activations", "int8", "int8_token"),
        _preset(
            "w8a8-static",
            "int8 per-channel weights, int8 static per-tensor activations (percentile)",
            "int8",
            "int8_static",
        ),
        _preset("w8", "int8 per-channel weights, float activations", "int8"),
        _preset("w4g128", "int4 asymmetric weights, groups of 128", "int4_g128"),
        _preset("w3g64", "int3 asymmetric weights, groups of 64", "int3_g64"),
        _preset("w2g64", "int2 asymmetric weights, groups of 64", "int2_g64"),
        _preset("fp8", "FP8 E4M3 per-channel weights, FP8 E4M3 dynamic per-token activations", "fp8_e4m3", "fp8_token"),
        _preset("fp4", "FP4 E2M1 weights with a scale per 32 (MXFP4-like), float activations", "fp4_e2m1"),
        _preset(
            "ternary",
            "BitNet b1.58: absmean ternary weights, int8 dynamic per-token activations",
            "ternary_absmean",
            "int8_token",
        ),
        _preset("binary", "1-bit weights (sign x per-channel mean|w|), float activations", "binary"),
        _preset("w1a1", "1-bit weights and 1-bit activations (sign x per-token mean|x|)", "binary", "binary_token"),
    )
}

#: The recipes the demo runs, in table order.
DEMO_PRESETS: tuple[str, ...] = ("w8a8", "w8a8-static", "w4g128", "w3g64", "w2g64", "fp8", "fp4", "ternary", "binary")

#: ``lowbit demo --suite ptq``: every post-training method at every bit width.
PTQ_SUITE: tuple[str, ...] = tuple(
    f"{p}-{m}" for p in ("w4g128", "w3g64", "w2g64") for m in ("rtn", "hqq", "gptq", "awq")
) + ("w8a8-rtn", "w8a8-smoothquant", "w8a8-gptq")

SUITES: dict[str, tuple[str, ...]] = {"default": DEMO_PRESETS, "ptq": PTQ_SUITE}


def get_preset(name: str) -> Recipe:
    """A named preset; ``<preset>-<method>`` swaps the method (``w3g64-gptq``) once that method is registered."""
    if name in PRESETS:
        return PRESETS[name]
    base, _, method = name.rpartition("-")
    if base in PRESETS and method:
        from dataclasses import replace

        r = PRESETS[base]
        return replace(r, name=name, stages=tuple(replace(s, method=method) for s in r.stages))
    raise RecipeError(
        f"unknown recipe '{name}'{suggest(name, list(PRESETS))}: pass a preset "
        f"({', '.join(PRESETS)}) or a YAML file path"
    )


def load_recipe(recipe: str | Path | Recipe | dict[str, Any]) -> Recipe:
    """Resolve a preset name, a YAML path, a dict or a Recipe object to a validated `Recipe`."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return Recipe.from_dict(recipe)
    text = str(recipe)
    path = Path(text)
    if text.endswith((".yaml", ".yml")) or path.is_file():
        if not path.is_file():
            raise RecipeError(f"recipe file '{text}' not found")
        return Recipe.from_yaml(path.read_text(), where=path.name)
    return get_preset(text)
