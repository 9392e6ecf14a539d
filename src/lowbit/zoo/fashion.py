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
import json
import os
import subprocess
import time
from functools import lru_cache
from pathlib import Path
from typing import IO

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from lowbit.errors import DataError
from lowbit.measure.quality import accuracy, agreement, mean_cosine
from lowbit.report.atomic import atomic_path, atomic_write_text
from lowbit.zoo.base import Workload, register_workload
from lowbit.zoo.cache import cache_dir
from lowbit.zoo.digits import Block

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


class FashionViT(nn.Module):
    """ViT with a conv stem: 28×28 → 7×7 = 49 tokens of width 96, 4 blocks, mean pooling."""

    def __init__(self, dim: int = 96, depth: int = 4, heads: int = 4, mlp: int = 192) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 48, 3, stride=2, padding=1), nn.GELU(), nn.Conv2d(48, dim, 2, stride=2))
        self.pos = nn.Parameter(torch.zeros(1, 49, dim))
        self.blocks = nn.ModuleList([Block(dim, heads, mlp) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)
        nn.init.trunc_normal_(self.pos, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x).flatten(2).transpose(1, 2) + self.pos
        for blk in self.blocks:
            h = blk(h)
        return self.head(self.norm(h.mean(1)))


SPECS = {
    "fmnist-cnn": {"cls": FashionCNN, "epochs": 3, "lr": 2e-3, "smoothing": 0.0, "batch": 128, "n_train": 30000},
    "fmnist-vit": {"cls": FashionViT, "epochs": 4, "lr": 2e-3, "smoothing": 0.1, "batch": 128, "n_train": 30000},
}


def train_fashion_model(name: str, seed: int = 0, progress: bool = True) -> tuple[nn.Module, float]:
    """Train ``name`` (seeded, on ``n_train`` training images); returns the model and its test accuracy."""
    spec = SPECS[name]
    x_tr, y_tr, x_te, y_te = fashion_split()
    x_tr, y_tr = x_tr[: spec["n_train"]], y_tr[: spec["n_train"]]
    torch.manual_seed(seed)
    model = spec["cls"]()
    opt = torch.optim.AdamW(model.parameters(), lr=spec["lr"], weight_decay=0.05)
    steps = (len(y_tr) + spec["batch"] - 1) // spec["batch"]
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=spec["lr"], total_steps=spec["epochs"] * steps)
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(spec["epochs"]):
        model.train()
        perm = torch.randperm(len(y_tr), generator=gen)
        bar = tqdm(
            range(steps),
            desc=f"training {name} epoch {epoch + 1}/{spec['epochs']} (first use, cached)",
            disable=None if progress else True,
            leave=False,
        )
        for i in bar:
            idx = perm[i * spec["batch"] : (i + 1) * spec["batch"]]
            loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx], label_smoothing=spec["smoothing"])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        acc = accuracy(torch.cat([model(x_te[i : i + 1000]) for i in range(0, len(y_te), 1000)]), y_te)
    return model, acc


def load_or_train(name: str, progress: bool = True) -> nn.Module:
    path = cache_dir() / f"{name}-v1.safetensors"
    model = SPECS[name]["cls"]()
    if path.is_file():
        try:
            model.load_state_dict(load_file(str(path)))
            return model.eval()
        except Exception:  # noqa: BLE001 — retrain a damaged cache
            pass
    t0 = time.perf_counter()
    model, acc = train_fashion_model(name, progress=progress)
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    atomic_write_text(
        path.with_suffix(".json"), json.dumps({"test_accuracy": acc, "train_seconds": time.perf_counter() - t0})
    )
    return model.eval()


def _workload(name: str, description: str) -> Workload:
    ref: dict[str, torch.Tensor] = {}

    def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([model(x[i : i + 1000]) for i in range(0, len(x), 1000)])

    def evaluate(model: nn.Module) -> dict[str, float]:
        _, _, x_te, y_te = fashion_split()
        if "fp32" not in ref:
            ref["fp32"] = logits(load_or_train(name), x_te)
        out = logits(model, x_te)
        return {"accuracy": accuracy(out, y_te), "agreement": agreement(out, ref["fp32"]),
                "logit_cosine": mean_cosine(out, ref["fp32"])}

    def calibration(n: int) -> list[torch.Tensor]:
        x_tr = fashion_split()[0]
        idx = torch.randperm(len(x_tr), generator=torch.Generator().manual_seed(1))[: max(n, 1)]
        return [x_tr[idx[i : i + 64]] for i in range(0, len(idx), 64)]

    def training(n: int | None = None) -> dict[str, torch.Tensor]:
        x_tr, y_tr, _, _ = fashion_split()
        return {"inputs": x_tr[:n], "labels": y_tr[:n]}

    return Workload(
        name,
        "classification",
        "accuracy",
        lambda: load_or_train(name),
        calibration,
        lambda b: fashion_split()[2][:b],
        evaluate,
        description,
        training,
    )


register_workload("fmnist-cnn", default=False)(lambda: _workload("fmnist-cnn", "CNN on Fashion-MNIST (28×28)"))
register_workload("fmnist-vit", default=False)(lambda: _workload("fmnist-vit", "ViT with 49 tokens on Fashion-MNIST"))
