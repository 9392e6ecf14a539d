"""Generated from the method registry: every method × tiny models × {forward, beats-or-equals RTN, save/load}."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowbit
from lowbit.io import load, save
from lowbit.methods import available_methods, get_method
from lowbit.recipe import Recipe

METHODS = available_methods()


class TinyTransformer(nn.Module):
    """Two pre-LN blocks in a ModuleList, so sequential methods go block by block."""

    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.inp = nn.Linear(12, d)
        self.blocks = nn.ModuleList([_Block(d) for _ in range(2)])
        self.out = nn.Linear(d, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for b in self.blocks:
            h = b(h)
        return self.out(h.mean(1))


class _Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = self.ln1(h)
        a = torch.softmax(self.q(x) @ self.k(x).transpose(1, 2) / 6.0, -1) @ self.v(x)
        h = h + self.o(a)
        return h + self.fc2(torch.nn.functional.gelu(self.fc1(self.ln2(h))))


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(64, 32),
        nn.ReLU(),
        nn.Linear(32, 10),
    )


def _correlated(n: int, shape: tuple[int, ...], seed: int) -> list[torch.Tensor]:
    """Correlated inputs from one fixed distribution; ``seed`` picks the samples (calibration vs test)."""
    mix = torch.randn(shape[-1], shape[-1], generator=torch.Generator().manual_seed(99)) / shape[-1] ** 0.5
    mix = mix + torch.eye(shape[-1])
    g = torch.Generator().manual_seed(seed)
    scales = torch.ones(shape[-1])
    scales[:2] = 8.0  # two outlier channels, as in real activations
    return [(torch.randn(*shape, generator=g) @ mix) * scales for _ in range(n)]


MODELS = {
    "transformer": (TinyTransformer, lambda s: _correlated(8, (8, 6, 12), s)),
    "cnn": (_cnn, lambda s: [torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(s)) for _ in range(4)]),
}


def _recipe(method: str) -> Recipe:
    acts = "int8_token" if method == "smoothquant" else None
    weights = "int8" if method == "smoothquant" else "int3_g64"
    return Recipe.from_dict(
        {
            "name": f"t-{method}",
            "stages": [{"method": method, "weights": weights, "activations": acts, "keep_first_last": False}],
        }
    )


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("method", METHODS)
def test_method_runs_saves_and_loads(tmp_path, method: str, model_name: str) -> None:
    torch.manual_seed(0)
    build, data = MODELS[model_name]
    base = build().eval()
    calib, test = data(1), data(2)
    recipe = _recipe(method)
    q = lowbit.compress(base, recipe, data=calib if get_method(method).needs_data else None, progress=False)
    with torch.no_grad():
        y = torch.cat([q(x) for x in test])
    assert torch.isfinite(y).all()
    save(q, tmp_path / "ck")
    q2 = load(tmp_path / "ck", model=base)
    with torch.no_grad():
        assert torch.equal(torch.cat([q2(x) for x in test]), y)


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("method", [m for m in METHODS if m not in ("rtn", "smoothquant", "qat")])
def test_method_output_error_not_worse_than_rtn(method: str, model_name: str) -> None:
    torch.manual_seed(0)
    build, data = MODELS[model_name]
    base = build().eval()
    calib, test = data(1), data(2)
    with torch.no_grad():
        ref = torch.cat([base(x) for x in test])

        def err(m: str) -> float:
            q = lowbit.compress(base, _recipe(m), data=calib, progress=False)
            return (torch.cat([q(x) for x in test]) - ref).pow(2).mean().item()

        assert err(method) <= err("rtn") * 1.02
