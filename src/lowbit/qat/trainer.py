"""The QAT trainer: distillation from the original model, resumable epoch checkpoints, deterministic, DDP-ready.

Batches are drawn from in-memory tensors with a permutation seeded by ``(seed, epoch)``, and the RNG state is saved
with every epoch checkpoint, so a run killed mid-epoch and resumed from its last checkpoint ends with exactly the
weights of an uninterrupted run. Under ``torch.distributed`` (gloo, e.g. ``torchrun``) each rank takes its slice of
every batch, the student is wrapped in DDP, and only rank 0 writes checkpoints.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lowbit.qat.trainer import TrainConfig, train
    >>> teacher = nn.Linear(8, 3)
    >>> student = nn.Linear(8, 3)
    >>> x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    >>> r = train(student, teacher, x, y, TrainConfig(epochs=2, batch_size=16, lr=1e-2), progress=False)
    >>> len(r.losses)
    2
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from lowbit.batches import run_model
from lowbit.distill.losses import cosine_kd, feature_mse, logit_kd
from lowbit.errors import CheckpointError, DataError
from lowbit.report.atomic import atomic_dir

Inputs = torch.Tensor | dict[str, torch.Tensor]


@dataclass
class TrainConfig:
    """Optimisation settings of a QAT stage (recipe ``options``)."""

    epochs: int = 5
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: str = "adamw"  # adamw | sgd
    schedule: str = "cosine"  # cosine | constant | onecycle
    warmup_steps: int = 0
    loss: str = "kd"  # kd (logits + labels) | ce | cosine (embeddings) | mse
    temperature: float = 2.0
    alpha: float = 0.5  # weight of the hard-label CE term in kd
    seed: int = 0
    grad_clip: float | None = 1.0
    checkpoint_dir: str | None = None
    device: str = "cpu"  # where training runs ("cuda" for a GPU); the trained model is returned on the CPU


class TrainingInterrupted(RuntimeError):
    """Raised when ``stop_after_steps`` cuts a run short (simulates a killed process in tests)."""


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)
    metrics: list[dict[str, float]] = field(default_factory=list)
    resumed_from: int | None = None
    seconds: float = 0.0


def _n(inputs: Inputs) -> int:
    return int(next(iter(inputs.values())).shape[0] if isinstance(inputs, dict) else inputs.shape[0])


def _take(inputs: Inputs, idx: torch.Tensor) -> Inputs:
    """Rows ``idx`` of the inputs; padded token batches are trimmed to their longest sequence."""
    if not isinstance(inputs, dict):
        return inputs[idx]
    batch = {k: v[idx] for k, v in inputs.items()}
    mask = batch.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        length = int(mask.sum(1).max())
        batch = {k: v[:, :length] if v.dim() == 2 and v.shape[1] == mask.shape[1] else v for k, v in batch.items()}
    return batch


def _to(inputs: Inputs, device: torch.device) -> Inputs:
    if isinstance(inputs, dict):
        return {k: v.to(device) for k, v in inputs.items()}
    return inputs.to(device)


def _set_progress(model: nn.Module, p: float) -> None:
    for m in model.modules():
        if hasattr(m, "set_progress") and m is not model:
            m.set_progress(p)


def _loss(cfg: TrainConfig, s: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    if cfg.loss == "kd":
        return logit_kd(s, t, y, temperature=cfg.temperature, alpha=cfg.alpha if y is not None else 0.0)
    if cfg.loss == "ce":
        if y is None:
            raise DataError("loss 'ce' needs labels")
        return nn.functional.cross_entropy(s, y)
    if cfg.loss == "cosine":
        return cosine_kd(s, t)
    if cfg.loss == "mse":
        return feature_mse(s, t)
    raise DataError(f"unknown QAT loss '{cfg.loss}': use kd, ce, cosine or mse")


def _optimizer(cfg: TrainConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _lr_factor(cfg: TrainConfig, step: int, total: int) -> float:
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    frac = (step - cfg.warmup_steps) / max(total - cfg.warmup_steps, 1)
    return 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))


# ---------------------------------------------------------------------------------------------- checkpoints
def _save_checkpoint(
    path: Path, model: nn.Module, opt: torch.optim.Optimizer, epoch: int, result: TrainResult, cfg: TrainConfig
) -> None:
    tensors = {f"model.{k}": v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    opt_state = opt.state_dict()
    for pid, st in opt_state["state"].items():
        for k, v in st.items():
            tensors[f"opt.{pid}.{k}"] = (
                (v if isinstance(v, torch.Tensor) else torch.tensor(v)).cpu().contiguous().clone()
            )
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {
        "epoch": epoch,
        "param_groups": opt_state["param_groups"],
        "losses": result.losses,
        "metrics": result.metrics,
        "config": asdict(cfg),
    }
    with atomic_dir(path) as tmp:
        save_file(tensors, str(Path(tmp) / "state.safetensors"))
        (Path(tmp) / "trainer.json").write_text(json.dumps(meta))


def _load_checkpoint(path: Path, model: nn.Module, opt: torch.optim.Optimizer, result: TrainResult) -> int:
    try:
        tensors = load_file(str(path / "state.safetensors"))
        meta = json.loads((path / "trainer.json").read_text())
    except Exception as exc:  # noqa: BLE001 — any damage means the same thing to the user
        raise CheckpointError(f"QAT checkpoint '{path}' is unreadable ({exc}); delete it to start over") from None
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, pid, name = k.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    result.losses, result.metrics = list(meta["losses"]), list(meta["metrics"])
    return int(meta["epoch"])


# ---------------------------------------------------------------------------------------------- training
def train(
    student: nn.Module,
    teacher: nn.Module | None,
    inputs: Inputs,
    labels: torch.Tensor | None,
    cfg: TrainConfig,
    *,
    eval_fn: Callable[[nn.Module], dict[str, float]] | None = None,
    progress: bool = True,
    stop_after_steps: int | None = None,
) -> TrainResult:
    """Train ``student`` to match ``teacher`` (and ``labels``); returns per-epoch losses and metrics.

    ``stop_after_steps`` aborts the run after that many optimiser steps (used to test resumption)."""

    with torch.enable_grad():
        return _train(
            student, teacher, inputs, labels, cfg, eval_fn=eval_fn, progress=progress, stop_after_steps=stop_after_steps
        )


def _train(
    student: nn.Module,
    teacher: nn.Module | None,
    inputs: Inputs,
    labels: torch.Tensor | None,
    cfg: TrainConfig,
    *,
    eval_fn: Callable[[nn.Module], dict[str, float]] | None,
    progress: bool,
    stop_after_steps: int | None,
) -> TrainResult:
    import time

    t0 = time.perf_counter()
    n = _n(inputs)
    if n == 0:
        raise DataError("QAT needs training data: got 0 examples")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    torch.manual_seed(cfg.seed)
    device = torch.device(cfg.device)
    student.to(device)
    if teacher is not None:
        teacher.to(device)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = _optimizer(cfg, params)
    result = TrainResult()
    start_epoch = 0
    ckpt = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else None
    if ckpt is not None and (ckpt / "trainer.json").is_file():
        start_epoch = _load_checkpoint(ckpt, student, opt, result) + 1
        result.resumed_from = start_epoch
    model: nn.Module = student
    if world > 1:
        model = nn.parallel.DistributedDataParallel(student)
    if teacher is not None:
        teacher.eval()
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    steps_done = 0
    for epoch in range(start_epoch, cfg.epochs):
        student.train()
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
        bar = tqdm(
            range(steps_per_epoch),
            desc=f"QAT epoch {epoch + 1}/{cfg.epochs}",
            disable=None if (progress and not rank) else True,
            leave=False,
        )
        running = 0.0
        for i in bar:
            step = epoch * steps_per_epoch + i
            _set_progress(student, step / max(total, 1))
            for g in opt.param_groups:
                g["lr"] = cfg.lr * _lr_factor(cfg, step, total)
            idx = perm[i * cfg.batch_size : (i + 1) * cfg.batch_size]
            idx = idx[rank::world]
            xb = _to(_take(inputs, idx), device)
            yb = labels[idx].to(device) if labels is not None else None
            with torch.no_grad():
                tb = run_model(teacher, xb) if teacher is not None else None
            sb = run_model(model, xb)
            loss = _loss(cfg, sb, tb if tb is not None else sb.detach(), yb)
            if not torch.isfinite(loss):
                raise DataError(
                    f"QAT loss became {loss.item()} at epoch {epoch + 1}, step {i}: lower the learning "
                    "rate or check the data"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            running += loss.item()
            bar.set_postfix(loss=f"{running / (i + 1):.4f}")
            steps_done += 1
            if stop_after_steps is not None and steps_done >= stop_after_steps:
                raise TrainingInterrupted(f"stopped after {steps_done} steps")
        result.losses.append(running / steps_per_epoch)
        student.eval()
        if eval_fn is not None and rank == 0:
            result.metrics.append({k: float(v) for k, v in eval_fn(student).items()})
        if ckpt is not None and rank == 0:
            _save_checkpoint(ckpt, student, opt, epoch, result, cfg)
        if world > 1:
            dist.barrier()
    _set_progress(student, 1.0)
    student.eval().cpu()
    if teacher is not None:
        teacher.cpu()
    result.seconds = time.perf_counter() - t0
    return result
