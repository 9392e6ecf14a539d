"""``digits-cnn`` and ``digits-vit``: scikit-learn's bundled 8×8 digits, models trained on first use and cached.

Split: stratified, seed 0, 1347 train / 450 test. Pixels scaled to [0, 1] then standardised with the training
mean and std. Training is deterministic (seeded, one thread) and takes seconds; weights are cached as safetensors
(atomically) with a JSON note of the test accuracy, and retrained if the cache is damaged.

Example:
    >>> from lowbit.zoo.digits import digits_split
    >>> x_tr, y_tr, x_te, y_te = digits_split()
    >>> tuple(x_tr.shape), tuple(x_te.shape)
    ((1347, 1, 8, 8), (450, 1, 8, 8))
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import nn

from lowbit.zoo.base import register_workload
from lowbit.zoo.classify import TrainSpec, classification_workload
from lowbit.zoo.vit import ConvStemViT

ARCH_VERSION = 1


@lru_cache(maxsize=1)
def digits_split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train, y_train, x_test, y_test)`` as float tensors ``(N, 1, 8, 8)`` and int64 labels."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    idx_tr, idx_te = train_test_split(torch.arange(len(y)).numpy(), test_size=450, stratify=y.numpy(), random_state=0)
    x_tr, x_te = x[idx_tr], x[idx_te]
    mean, std = x_tr.mean(), x_tr.std()
    return (x_tr - mean) / std, y[idx_tr], (x_te - mean) / std, y[idx_te]


class DigitsCNN(nn.Module):
    """conv32 → conv64 → pool → fc128 → fc10 with BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(64 * 4 * 4, 128), nn.ReLU(), nn.Dropout(0.2), nn.Linear(128, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def digits_vit() -> nn.Module:
    """Tiny ViT: conv3×3 + strided conv stem → 16 tokens of width 64, 2 blocks, mean pooling."""
    stem = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.GELU(), nn.Conv2d(32, 64, 2, stride=2))
    return ConvStemViT(stem, tokens=16, dim=64, depth=2, heads=4, mlp=128)


SPECS: dict[str, tuple] = {
    "digits-cnn": (DigitsCNN, TrainSpec(epochs=15, lr=3e-3, batch=32), "small CNN on 8×8 digits"),
    "digits-vit": (
        digits_vit,
        TrainSpec(epochs=60, lr=3e-3, batch=64, smoothing=0.1),
        "tiny ViT (conv stem, 16 tokens) on 8×8 digits",
    ),
}

for _name, (_cls, _spec, _desc) in SPECS.items():
    register_workload(_name)(
        lambda n=_name, c=_cls, sp=_spec, d=_desc: classification_workload(n, d, c, digits_split, sp, ARCH_VERSION)
    )
