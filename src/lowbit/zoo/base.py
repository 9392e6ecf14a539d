"""`Workload`: a model, its calibration data and its quality evaluation, behind one small interface.

Example:
    >>> from lowbit.zoo import list_workloads
    >>> list_workloads()
    ['digits-cnn', 'digits-vit', 'minilm']
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from lowbit.batches import Batch, run_model
from lowbit.errors import ModelError
from lowbit.formats.spec import suggest


@dataclass
class Workload:
    """A model plus the data that calibrates and evaluates it.

    Attributes:
        build: a fresh fp32 model in eval mode (each call an independent copy).
        calibration_batches: ``n`` samples → batches drawn from data disjoint from the evaluation set.
        example_batch: batch size → one realistic input (latency, MAC counting).
        evaluate: quality metrics of a (possibly compressed) model; fp32 references are cached inside.
        training_data: ``n`` → ``{"inputs": ..., "labels": ...}`` for QAT (None when the workload has none).
    """

    name: str
    task: str
    primary_metric: str
    build: Callable[[], nn.Module]
    calibration_batches: Callable[[int], list[Batch]]
    example_batch: Callable[[int], Batch]
    evaluate: Callable[[nn.Module], dict[str, float]]
    description: str = ""
    training_data: Callable[[int | None], dict[str, Any]] | None = None


_REGISTRY: dict[str, Callable[[], Workload]] = {}
_EXTRA: set[str] = set()
_CACHE: dict[str, Workload] = {}


def register_workload(name: str, *, default: bool = True) -> Callable[[Callable[[], Workload]], Callable[[], Workload]]:
    """Register a workload factory; ``default=False`` keeps it out of ``lowbit demo``'s default set."""

    def deco(factory: Callable[[], Workload]) -> Callable[[], Workload]:
        _REGISTRY[name] = factory
        if not default:
            _EXTRA.add(name)
        return factory

    return deco


#: The modules of the embedded workloads, in the order they are listed (whichever was imported first).
_BUILTIN = ("lowbit.zoo.digits", "lowbit.zoo.fashion", "lowbit.zoo.minilm")


def list_workloads(include_extra: bool = False) -> list[str]:
    """Names of the default workloads (and the heavier opt-in ones with ``include_extra``): the embedded ones in a
    fixed order, then any registered elsewhere, in registration order."""
    _load_builtin()

    def rank(name: str) -> int:
        module = getattr(_REGISTRY[name], "__module__", "")
        return _BUILTIN.index(module) if module in _BUILTIN else len(_BUILTIN)

    return sorted((n for n in _REGISTRY if include_extra or n not in _EXTRA), key=rank)


def get_workload(name: str) -> Workload:
    """The embedded workload ``name`` (created once per process)."""
    _load_builtin()
    if name not in _REGISTRY:
        raise ModelError(f"unknown workload '{name}'{suggest(name, list(_REGISTRY))}; known: {', '.join(_REGISTRY)}")
    if name not in _CACHE:
        _CACHE[name] = _REGISTRY[name]()
    return _CACHE[name]


def _load_builtin() -> None:
    from lowbit.zoo import digits, fashion, minilm  # noqa: F401  (registers the workloads)


__all__ = ["Batch", "Workload", "get_workload", "list_workloads", "register_workload", "run_model"]
