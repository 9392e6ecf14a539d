"""User models as workloads: a Hugging Face directory, or ``package.module:function`` returning an ``nn.Module``.

A ``module:function`` model may come with ``data="package.module:function"`` returning a dict with
``"calibration"`` (a list of input batches) and ``"eval"`` (a list of ``(batch, labels)`` pairs, or of batches).
With labels the workload reports accuracy and agreement with fp32; without, the cosine similarity of the outputs
to the fp32 model's.

Example:
    >>> from lowbit.zoo.user import load_user_workload
    >>> try:
    ...     load_user_workload("no/such/dir")
    ... except Exception as exc:
    ...     print(type(exc).__name__)
    ModelError
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.batches import run_model
from lowbit.errors import DataError, ModelError
from lowbit.measure.quality import accuracy, agreement, mean_cosine
from lowbit.zoo.base import Workload


def _import(spec: str, what: str) -> Callable[..., Any]:
    mod_name, _, fn_name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as exc:
        raise ModelError(f"{what} '{spec}' cannot be imported: {exc}") from None
    if not callable(fn):
        raise ModelError(f"{what} '{spec}' is not callable")
    return fn


def _callable_workload(spec: str, data: str | None) -> Workload:
    factory = _import(spec, "model")

    def build() -> nn.Module:
        model = factory()
        if not isinstance(model, nn.Module):
            raise ModelError(f"model '{spec}' returned {type(model).__name__}, not an nn.Module")
        return model.eval()

    if data is None:
        raise ModelError(
            f"model '{spec}' needs data: pass --data package.module:function returning "
            "{'calibration': [batches], 'eval': [(batch, labels)] or [batches]}"
        )
    d = _import(data, "data")()
    calib, evals = list(d.get("calibration") or []), list(d.get("eval") or [])
    if not calib or not evals:
        raise DataError(f"data '{data}' must return non-empty 'calibration' and 'eval' lists")
    labelled = isinstance(evals[0], (tuple, list)) and len(evals[0]) == 2
    ref: dict[str, torch.Tensor] = {}

    def outputs(model: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([run_model(model, e[0] if labelled else e).float().flatten(1) for e in evals])

    def evaluate(model: nn.Module) -> dict[str, float]:
        if "fp32" not in ref:
            ref["fp32"] = outputs(build())
        out = outputs(model)
        if labelled:
            labels = torch.cat([e[1] for e in evals])
            return {"accuracy": accuracy(out, labels), "agreement": agreement(out, ref["fp32"])}
        return {"cosine": mean_cosine(out, ref["fp32"])}

    def example(batch_size: int) -> Any:
        b = calib[0]
        return {k: v[:batch_size] for k, v in b.items()} if isinstance(b, dict) else b[:batch_size]

    def calibration(n: int) -> list[Any]:
        return calib

    return Workload(
        spec,
        "classification" if labelled else "fidelity",
        "accuracy" if labelled else "cosine",
        build,
        calibration,
        example,
        evaluate,
        f"user model {spec}",
    )


def load_user_workload(spec: str, data: str | None = None) -> Workload:
    """A workload for a user model (see the module docstring)."""
    path = Path(spec)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(
                f"'{spec}' is a directory but not a Hugging Face model (no config.json) nor a lowbit "
                "checkpoint (no lowbit.json)"
            )
        from lowbit.zoo.minilm import text_workload

        return text_workload(str(path.resolve()), str(path.resolve()), f"Hugging Face encoder at {spec}")
    if ":" in spec and not path.exists():
        return _callable_workload(spec, data)
    raise ModelError(
        f"model '{spec}' not found: not a workload name (digits-cnn, digits-vit, minilm), not a "
        "directory, not package.module:function"
    )
