"""Shared machinery of the image-classification workloads: seeded training on first use, a safetensors cache,
and the workload (accuracy, agreement and logit cosine to the fp32 model).

Example:
    >>> from lowbit.zoo.classify import TrainSpec
    >>> TrainSpec(epochs=1, lr=1e-3, batch=32).smoothing
    0.0
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from lowbit.measure.quality import accuracy, agreement, mean_cosine
from lowbit.report.atomic import atomic_path, atomic_write_text
from lowbit.zoo.base import Workload
from lowbit.zoo.cache import cache_dir

Split = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class TrainSpec:
    """How a workload's fp32 model is trained on first use (AdamW + OneCycle, one thread)."""

    epochs: int
    lr: float
    batch: int
    smoothing: float = 0.0
    n_train: int | None = None
    weight_decay: float = 0.05


def batched_logits(model: nn.Module, x: torch.Tensor, chunk: int = 1000) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(x[i : i + chunk]) for i in range(0, len(x), chunk)])


def train_classifier(
    cls: Callable[[], nn.Module], split: Split, spec: TrainSpec, name: str, seed: int = 0, progress: bool = True
) -> tuple[nn.Module, float]:
    """Train ``cls()`` on the split's training part (seeded, one thread); returns the model and test accuracy."""
    x_tr, y_tr, x_te, y_te = split
    x_tr, y_tr = x_tr[: spec.n_train], y_tr[: spec.n_train]
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        model = cls()
        opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
        steps = (len(y_tr) + spec.batch - 1) // spec.batch
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=spec.lr, total_steps=spec.epochs * steps)
        gen = torch.Generator().manual_seed(seed)
        bar = tqdm(range(spec.epochs), desc=f"training {name} (first use, cached)", disable=None if progress else True)
        for _ in bar:
            model.train()
            perm = torch.randperm(len(y_tr), generator=gen)
            for i in range(steps):
                idx = perm[i * spec.batch : (i + 1) * spec.batch]
                loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx], label_smoothing=spec.smoothing)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
        model.eval()
        acc = accuracy(batched_logits(model, x_te), y_te)
    finally:
        torch.set_num_threads(old)
    return model, acc


def load_or_train(
    name: str,
    cls: Callable[[], nn.Module],
    split: Callable[[], Split],
    spec: TrainSpec,
    version: int = 1,
    progress: bool = True,
) -> nn.Module:
    """The cached model, trained and cached (atomically) on first use; a damaged cache is retrained."""
    path = cache_dir() / f"{name}-v{version}.safetensors"
    model = cls()
    if path.is_file():
        try:
            model.load_state_dict(load_file(str(path)))
            return model.eval()
        except Exception as exc:  # noqa: BLE001 — a damaged cache is retrained, never trusted
            warnings.warn(f"cached {name} weights at {path} are unreadable ({exc}); retraining", stacklevel=2)
    t0 = time.perf_counter()
    model, acc = train_classifier(cls, split(), spec, name, progress=progress)
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    meta = {"test_accuracy": acc, "seed": 0, "version": version, "train_seconds": time.perf_counter() - t0}
    atomic_write_text(path.with_suffix(".json"), json.dumps(meta))
    return model.eval()


def classification_workload(
    name: str,
    description: str,
    cls: Callable[[], nn.Module],
    split: Callable[[], Split],
    spec: TrainSpec,
    version: int = 1,
) -> Workload:
    """A `Workload` for an image classifier trained on ``split``."""
    ref: dict[str, torch.Tensor] = {}

    def build() -> nn.Module:
        return load_or_train(name, cls, split, spec, version)

    def evaluate(model: nn.Module) -> dict[str, float]:
        _, _, x_te, y_te = split()
        if "fp32" not in ref:
            ref["fp32"] = batched_logits(build(), x_te)
        out = batched_logits(model, x_te)
        return {
            "accuracy": accuracy(out, y_te),
            "agreement": agreement(out, ref["fp32"]),
            "logit_cosine": mean_cosine(out, ref["fp32"]),
        }

    def calibration(n: int) -> list[torch.Tensor]:
        x_tr = split()[0]
        idx = torch.randperm(len(x_tr), generator=torch.Generator().manual_seed(1))[: max(n, 1)]
        return [x_tr[idx[i : i + 64]] for i in range(0, len(idx), 64)]

    def training(n: int | None = None) -> dict[str, torch.Tensor]:
        x_tr, y_tr, _, _ = split()
        return {"inputs": x_tr[:n], "labels": y_tr[:n]}

    return Workload(
        name,
        "classification",
        "accuracy",
        build,
        calibration,
        lambda b: split()[2][:b],
        evaluate,
        description,
        training,
    )
