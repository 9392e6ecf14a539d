"""Knowledge-distillation losses (methods.md D1, D2, D5): logit KD, cosine KD, feature and attention alignment.

Example:
    >>> import torch
    >>> from lowbit.distill.losses import logit_kd, cosine_kd
    >>> t = torch.randn(4, 10)
    >>> float(logit_kd(t, t, alpha=0.0))
    0.0
    >>> float(cosine_kd(t, 3 * t)) < 1e-6
    True
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def logit_kd(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    temperature: float = 2.0,
    alpha: float = 0.5,
) -> torch.Tensor:
    """``α·CE(y, s) + (1−α)·T²·KL(softmax(t/T) ‖ softmax(s/T))``; α = 1 is plain cross-entropy."""
    t = temperature
    kl = (
        F.kl_div(
            F.log_softmax(student / t, dim=-1),
            F.log_softmax(teacher.detach() / t, dim=-1),
            reduction="batchmean",
            log_target=True,
        )
        * t
        * t
    )
    if labels is None or alpha == 0.0:
        return kl
    return alpha * F.cross_entropy(student, labels) + (1 - alpha) * kl


def cosine_kd(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean ``1 − cos(s, t)`` over rows: zero when the student matches the teacher up to scale."""
    return (1 - F.cosine_similarity(student.flatten(1), teacher.detach().flatten(1), dim=-1)).mean()


def feature_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared error between intermediate features."""
    return F.mse_loss(student, teacher.detach())


def attention_alignment(student_maps: list[torch.Tensor], teacher_maps: list[torch.Tensor]) -> torch.Tensor:
    """Squat-style alignment: mean over layers of ``1 − cos`` between attention maps (maximises similarity)."""
    terms = [
        (1 - F.cosine_similarity(s.flatten(1), t.detach().flatten(1), dim=-1)).mean()
        for s, t in zip(student_maps, teacher_maps, strict=True)
    ]
    return torch.stack(terms).mean()


LOSSES = ("kd", "ce", "cosine", "mse")
