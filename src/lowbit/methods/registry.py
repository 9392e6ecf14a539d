"""Registry of compression methods: a name bound to a class that turns selected layers into quantized weights.

A method gets the *plan* (which layers, in which formats) and optional calibration data, and returns one
`QTensor` per layer; module surgery, activation calibration and bookkeeping happen in `lowbit.compress`. A method
may also change the float model before quantization (e.g. fold scales into a LayerNorm).

Example:
    >>> from lowbit.methods.registry import available_methods, get_method
    >>> "rtn" in available_methods()
    True
    >>> get_method("rtn").needs_data
    False
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lowbit.errors import RecipeError
from lowbit.formats.qtensor import QTensor
from lowbit.formats.spec import QuantSpec, suggest


@dataclass
class LayerPlan:
    """One layer a stage compresses: its dotted name, the module and the formats it gets."""

    name: str
    module: nn.Module
    weights: QuantSpec | None
    activations: QuantSpec | None


#: Swaps a planned float layer for its quantized stand-in (with an optional input scale) and returns it.
SwapFn = Callable[[LayerPlan, QTensor | None, "torch.Tensor | None"], nn.Module]


@dataclass
class MethodContext:
    """What a method may use besides the plan: calibration batches, the stage options, a progress flag, and
    ``swap`` to replace layers during calibration (sequential methods quantize a layer before calibrating the
    next one). Layers a method does not swap itself are swapped by `lowbit.compress` from its return value."""

    data: Sequence[Any] | None = None
    options: dict[str, Any] = field(default_factory=dict)
    progress: bool = True
    swap: SwapFn | None = None


class Method:
    """Base class. Subclasses set ``name`` / ``needs_data`` and implement `quantize_layers`."""

    name: str = ""
    needs_data: bool = False
    #: Option names the method accepts (validated against recipes' ``options``).
    option_names: tuple[str, ...] = ()

    def quantize_layers(self, model: nn.Module, plan: list[LayerPlan], ctx: MethodContext) -> dict[str, QTensor]:
        raise NotImplementedError

    def check_options(self, options: dict[str, Any]) -> None:
        for key in options:
            if key not in self.option_names:
                raise RecipeError(
                    f"method '{self.name}' has no option '{key}'{suggest(key, self.option_names)}"
                    + (f"; options: {', '.join(self.option_names)}" if self.option_names else "")
                )


_METHODS: dict[str, type[Method]] = {}


def register_method(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator registering a `Method` under ``name``."""

    def deco(cls: type[Method]) -> type[Method]:
        cls.name = name
        _METHODS[name] = cls
        return cls

    return deco


def _ensure_loaded() -> None:
    import lowbit.methods  # noqa: F401  (importing the package registers the built-in methods)


def available_methods() -> list[str]:
    """Names of all registered methods."""
    _ensure_loaded()
    return sorted(_METHODS)


def get_method(name: str) -> Method:
    """A fresh instance of the method registered as ``name``."""
    _ensure_loaded()
    if name not in _METHODS:
        raise RecipeError(f"unknown method '{name}'{suggest(name, list(_METHODS))}; available: {', '.join(_METHODS)}")
    return _METHODS[name]()
