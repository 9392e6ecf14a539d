"""``fmnist-cnn`` and ``fmnist-vit``: Fashion-MNIST from Debian's ``dataset-fashion-mnist`` (MIT licence).

The idx.gz files are read directly (gunzip; byte 4 holds the number of dimensions, then one big-endian uint32 per
dimension, then uint8 data). Models are trained on first use (seeded, cached as safetensors): a small CNN and a ViT
with a strided conv stem giving 7×7 = 49 tokens. Without the package, a clear error says how to install it.

Example:
    >>> import gzip, io, struct
    >>> from lowbit.zoo.fashion import read_idx
    >>> raw = struct.pack(">BBBBII", 0, 0, 8, 2, 2, 3) + bytes(range(6))
    >>> read_idx(io.BytesIO(gzip.compress(raw))).shape
    (2, 3)
"""

from __future__ import annotations

import gzip
import os
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import IO

import numpy as np
import torch
from torch import nn

from lowbit.errors import DataError
from lowbit.zoo.base import register_workload
from lowbit.zoo.classify import TrainSpec, classification_workload
from lowbit.zoo.vit import ConvStemViT

FILES = {
    "train_x": "train-images-idx3-ubyte.gz",
    "train_y": "train-labels-idx1-ubyte.gz",
    "test_x": "t10k-images-idx3-ubyte.gz",
    "test_y": "t10k-labels-idx1-ubyte.gz",
}


def read_idx(f: str | Path | IO[bytes]) -> np.ndarray:
    """Read a gzip-compressed idx file into a uint8 array of its stored shape."""
    with gzip.open(f, "rb") as g:
        data = g.read()
    if len(data) < 4 or data[2] != 8:
        raise DataError("not an idx file of unsigned bytes")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataError(f"idx file is truncated: {body.size} values for shape {dims}")
    return body.reshape(dims)


def find_fashion_mnist() -> Path:
    """Directory holding the four idx.gz files (``$LOWBIT_FMNIST_DIR`` or Debian's package)."""
    candidates = [Path(os.environ["LOWBIT_FMNIST_DIR"])] if os.environ.get("LOWBIT_FMNIST_DIR") else []
    try:
        out = subprocess.run(
            ["dpkg", "-L", "dataset-fashion-mnist"], capture_output=True, text=True, timeout=10, check=False
        )
        candidates += [Path(p).parent for p in out.stdout.splitlines() if p.endswith(FILES["train_x"])]
    except (OSError, subprocess.SubprocessError):
        pass
    candidates.append(Path("/usr/share/datasets/fashion-mnist"))
    for c in candidates:
        if all((c / name).is_file() for name in FILES.values()):
            return c
    raise DataError(
        "Fashion-MNIST not found: install Debian's dataset-fashion-mnist (apt-get install "
        "dataset-fashion-mnist) or set LOWBIT_FMNIST_DIR to a folder with its four idx.gz files"
    )


@lru_cache(maxsize=1)
def fashion_split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train, y_train, x_test, y_test)``: 60k / 10k images ``(N, 1, 28, 28)`` standardised, int64 labels."""
    d = find_fashion_mnist()
    arrays = {k: read_idx(d / name) for k, name in FILES.items()}
    x_tr = torch.tensor(arrays["train_x"], dtype=torch.float32).unsqueeze(1) / 255.0
    x_te = torch.tensor(arrays["test_x"], dtype=torch.float32).unsqueeze(1) / 255.0
    mean, std = x_tr.mean(), x_tr.std()
    return (
        (x_tr - mean) / std,
        torch.tensor(arrays["train_y"], dtype=torch.int64),
        (x_te - mean) / std,
        torch.tensor(arrays["test_y"], dtype=torch.int64),
    )


class FashionCNN(nn.Module):
    """conv32 → conv64 → pool → conv128 → pool → fc256 → fc10 with BatchNorm."""

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
            nn.Conv2d(64, 128, 3, padding=1),
            nn.BatchNorm2d(128),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(128 * 7 * 7, 256), nn.ReLU(), nn.Dropout(0.2), nn.Linear(256, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def fashion_vit() -> nn.Module:
    """ViT with a conv stem: 28×28 → 7×7 = 49 tokens of width 96, 4 blocks, mean pooling."""
    stem = nn.Sequential(nn.Conv2d(1, 48, 3, stride=2, padding=1), nn.GELU(), nn.Conv2d(48, 96, 2, stride=2))
    return ConvStemViT(stem, tokens=49, dim=96, depth=4, heads=4, mlp=192)


SPECS: dict[str, tuple] = {
    "fmnist-cnn": (FashionCNN, TrainSpec(epochs=3, lr=2e-3, batch=128, n_train=30000), "CNN on Fashion-MNIST"),
    "fmnist-vit": (
        fashion_vit,
        TrainSpec(epochs=4, lr=2e-3, batch=128, smoothing=0.1, n_train=30000),
        "ViT with 49 tokens on Fashion-MNIST",
    ),
}

for _name, (_cls, _spec, _desc) in SPECS.items():
    register_workload(_name, default=False)(
        lambda n=_name, c=_cls, sp=_spec, d=_desc: classification_workload(n, d, c, fashion_split, sp)
    )
