"""Resolve the MODEL argument of the CLI and the ``source`` recorded in checkpoints.

MODEL is an embedded workload name (``digits-cnn``, ``digits-vit``, ``minilm``), a lowbit checkpoint directory,
a Hugging Face model directory, or ``package.module:function`` returning an ``nn.Module``.

Example:
    >>> from lowbit.models import source_of
    >>> source_of("digits-cnn")
    {'model': 'digits-cnn'}
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from lowbit.errors import ModelError
from lowbit.zoo import Workload, get_workload, list_workloads, load_user_workload


@dataclass
class Resolved:
    """A model ready to use, the workload that evaluates it, and whether it is already compressed."""

    model: nn.Module
    workload: Workload
    compressed: bool
    source: dict[str, Any]


def source_of(spec: str, data: str | None = None) -> dict[str, Any]:
    """The JSON-able record from which `build_from_source` rebuilds the float model."""
    out: dict[str, Any] = {
        "model": spec
        if spec in list_workloads(include_extra=True)
        else str(Path(spec).resolve())
        if Path(spec).exists()
        else spec
    }
    if data:
        out["data"] = data
    return out


def workload_for(source: dict[str, Any]) -> Workload:
    """Workload recorded in a source dict."""
    name = source.get("model")
    if not isinstance(name, str):
        raise ModelError(f"checkpoint source {source!r} names no model")
    if name in list_workloads(include_extra=True):
        return get_workload(name)
    return load_user_workload(name, data=source.get("data"))


def build_from_source(source: dict[str, Any]) -> nn.Module:
    """A fresh float model from a recorded source."""
    model = workload_for(source).build()
    model.lowbit_source = dict(source)  # type: ignore[assignment]
    return model


def resolve(spec: str, data: str | None = None) -> Resolved:
    """Turn the CLI's MODEL argument into a model + workload."""
    path = Path(spec)
    if path.is_dir() and (path / "lowbit.json").is_file():
        from lowbit.io import load, read_spec

        source = read_spec(path).get("source") or {}
        if not source:
            raise ModelError(
                f"checkpoint '{spec}' records no model source, so the CLI cannot evaluate it: load it "
                "in Python with lowbit.load(dir, model=...)"
            )
        return Resolved(load(path), workload_for(source), True, source)
    source = source_of(spec, data)
    workload = workload_for(source)
    model = workload.build()
    model.lowbit_source = source  # type: ignore[assignment]
    return Resolved(model, workload, False, source)
