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

import json
import time
import warnings
from collections.abc import Callable
from functools import lru_cache

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from lowbit.measure.quality import accuracy, agreement, mean_cosine
from lowbit.report.atomic import atomic_path, atomic_write_text
from lowbit.zoo.base import Workload, register_workload
from lowbit.zoo.cache import cache_dir

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


class Attention(nn.Module):
    """Multi-head self-attention written with ``nn.Linear`` so every projection can be quantized."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v)
        return self.proj(a.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.fc1, self.fc2 = nn.Linear(dim, mlp), nn.Linear(mlp, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class DigitsViT(nn.Module):
    """Tiny ViT: conv3×3 + strided conv stem → 16 tokens of width 64, 2 blocks, mean pooling."""

    def __init__(self, dim: int = 64, depth: int = 2, heads: int = 4, mlp: int = 128) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.GELU(), nn.Conv2d(32, dim, 2, stride=2))
        self.pos = nn.Parameter(torch.zeros(1, 16, dim))
        self.blocks = nn.ModuleList([Block(dim, heads, mlp) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)
        nn.init.trunc_normal_(self.pos, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x).flatten(2).transpose(1, 2) + self.pos
        for blk in self.blocks:
            h = blk(h)
        return self.head(self.norm(h.mean(1)))


SPECS: dict[str, dict] = {
    "digits-cnn": {"cls": DigitsCNN, "epochs": 15, "lr": 3e-3, "smoothing": 0.0, "batch": 32},
    "digits-vit": {"cls": DigitsViT, "epochs": 60, "lr": 3e-3, "smoothing": 0.1, "batch": 64},
}


def train_digits_model(name: str, seed: int = 0, progress: bool = True) -> tuple[nn.Module, float]:
    """Train ``name`` from scratch (one thread, seeded); returns the model and its test accuracy."""
    spec = SPECS[name]
    x_tr, y_tr, x_te, y_te = digits_split()
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        model = spec["cls"]()
        opt = torch.optim.AdamW(model.parameters(), lr=spec["lr"], weight_decay=0.05)
        steps = (len(y_tr) + spec["batch"] - 1) // spec["batch"]
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=spec["lr"], total_steps=spec["epochs"] * steps)
        gen = torch.Generator().manual_seed(seed)
        bar = tqdm(
            range(spec["epochs"]), desc=f"training {name} (first use, cached)", disable=None if progress else True
        )
        for _ in bar:
            model.train()
            perm = torch.randperm(len(y_tr), generator=gen)
            for i in range(steps):
                idx = perm[i * spec["batch"] : (i + 1) * spec["batch"]]
                loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx], label_smoothing=spec["smoothing"])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
        model.eval()
        with torch.no_grad():
            acc = accuracy(model(x_te), y_te)
    finally:
        torch.set_num_threads(old)
    return model, acc


def load_or_train(name: str, progress: bool = True) -> nn.Module:
    """The cached model, training (and caching) it on first use."""
    path = cache_dir() / f"{name}-v{ARCH_VERSION}.safetensors"
    model = SPECS[name]["cls"]()
    if path.is_file():
        try:
            model.load_state_dict(load_file(str(path)))
            return model.eval()
        except Exception as exc:  # noqa: BLE001 — a damaged cache is retrained, never trusted
            warnings.warn(f"cached {name} weights at {path} are unreadable ({exc}); retraining", stacklevel=2)
    t0 = time.perf_counter()
    model, acc = train_digits_model(name, progress=progress)
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    atomic_write_text(
        path.with_suffix(".json"),
        json.dumps(
            {"test_accuracy": acc, "seed": 0, "arch_version": ARCH_VERSION, "train_seconds": time.perf_counter() - t0}
        ),
    )
    return model.eval()


def _workload(name: str, description: str) -> Workload:
    x_tr, y_tr, x_te, y_te = digits_split()
    ref: dict[str, torch.Tensor] = {}

    def build() -> nn.Module:
        return load_or_train(name)

    def evaluate(model: nn.Module) -> dict[str, float]:
        with torch.no_grad():
            if "fp32" not in ref:
                ref["fp32"] = build()(x_te)
            logits = model(x_te)
        return {"accuracy": accuracy(logits, y_te), "agreement": agreement(logits, ref["fp32"]),
                "logit_cosine": mean_cosine(logits, ref["fp32"])}

    def calibration(n: int) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(1)
        idx = torch.randperm(len(y_tr), generator=g)[: max(n, 1)]
        return [x_tr[idx[i : i + 64]] for i in range(0, len(idx), 64)]

    def example(batch_size: int) -> torch.Tensor:
        return x_te[:batch_size]

    def training(n: int | None = None) -> dict[str, torch.Tensor]:
        return {"inputs": x_tr[:n], "labels": y_tr[:n]}

    return Workload(name, "classification", "accuracy", build, calibration, example, evaluate, description, training)


def _register(name: str, description: str) -> Callable[[], Workload]:
    return register_workload(name)(lambda: _workload(name, description))


_register("digits-cnn", "small CNN on 8×8 digits")
_register("digits-vit", "tiny ViT (conv stem, 16 tokens) on 8×8 digits")
