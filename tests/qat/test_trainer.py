"""QAT trainer: determinism, resumption after an interruption, KD loss zero for identical logits, export."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowbit
from lowbit.distill.losses import cosine_kd, logit_kd
from lowbit.nn import QuantLinear
from lowbit.nn.qat import QATLinear
from lowbit.qat.trainer import TrainConfig, TrainingInterrupted, train


def _task(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 16, generator=g)
    y = x[:, :4].argmax(1)
    torch.manual_seed(seed)
    teacher = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    train(teacher, None, x, y, TrainConfig(epochs=8, lr=1e-2, loss="ce", batch_size=32), progress=False)
    return teacher.eval(), x, y


def _student(teacher: nn.Module) -> nn.Module:
    s = nn.Sequential(
        *[
            QATLinear.from_float(m, weight="ternary", act="int8_token") if isinstance(m, nn.Linear) else m
            for m in teacher
        ]
    )
    return s


def test_kd_losses_zero_for_identical() -> None:
    t = torch.randn(8, 5)
    assert logit_kd(t, t, alpha=0.0).abs() < 1e-7
    y = torch.randint(0, 5, (8,))
    assert torch.isclose(logit_kd(t, t, y, alpha=1.0), nn.functional.cross_entropy(t, y))
    assert cosine_kd(t, 2 * t) < 1e-6


def test_resume_after_interruption_matches_uninterrupted(tmp_path) -> None:
    teacher, x, y = _task()
    cfg = dict(epochs=3, batch_size=32, lr=5e-3, seed=7)
    full = _student(teacher)
    torch.manual_seed(0)
    train(full, teacher, x, y, TrainConfig(**cfg), progress=False)

    part = _student(teacher)
    ck = str(tmp_path / "ck")
    with pytest.raises(TrainingInterrupted):  # killed mid-epoch 2 (after 1 full epoch = 8 steps)
        train(part, teacher, x, y, TrainConfig(**cfg, checkpoint_dir=ck), progress=False, stop_after_steps=12)
    resumed = _student(teacher)
    r = train(resumed, teacher, x, y, TrainConfig(**cfg, checkpoint_dir=ck), progress=False)
    assert r.resumed_from == 1
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_qat_method_improves_on_ptq_ternary_and_exports() -> None:
    teacher, x, y = _task()
    xt = torch.randn(512, 16, generator=torch.Generator().manual_seed(5))
    yt = xt[:, :4].argmax(1)

    def acc(m: nn.Module) -> float:
        with torch.no_grad():
            return (m(xt).argmax(1) == yt).float().mean().item()

    recipe = {
        "name": "t",
        "stages": [
            {"method": "rtn", "weights": "ternary_absmean", "activations": "int8_token", "keep_first_last": False}
        ],
    }
    ptq = lowbit.compress(teacher, recipe, progress=False)
    recipe["stages"][0].update(method="qat", options={"epochs": 6, "lr": 3e-3, "batch_size": 32})
    qat = lowbit.compress(teacher, recipe, data={"inputs": x, "labels": y}, progress=False)
    assert isinstance(qat[0], QuantLinear) and qat[0].weight_spec.kind == "ternary"
    assert acc(qat) >= acc(ptq)
