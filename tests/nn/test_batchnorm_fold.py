"""BatchNorm folding: the closed form, which pairs fold, and that compress / pack / save / load keep the function."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import lowbit
from lowbit.errors import CheckpointError, RecipeError
from lowbit.kernels.dispatch import use_mode
from lowbit.nn.batchnorm_fold import fold_batchnorm, fold_params
from lowbit.recipe import Recipe, load_recipe


def trained_bn(bn: nn.modules.batchnorm._BatchNorm, seed: int = 0) -> nn.modules.batchnorm._BatchNorm:
    """Running statistics and affine parameters far from their defaults (a freshly built BatchNorm is the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=g))
        bn.running_var.copy_(torch.rand(bn.num_features, generator=g) * 3 + 0.1)
        if bn.affine:
            bn.weight.copy_(torch.randn(bn.num_features, generator=g))
            bn.bias.copy_(torch.randn(bn.num_features, generator=g))
    return bn


def cnn(bias: bool = False) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1, bias=bias),
        trained_bn(nn.BatchNorm2d(32), 1),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1, bias=bias),
        trained_bn(nn.BatchNorm2d(32), 2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 8 * 8, 64),
        trained_bn(nn.BatchNorm1d(64), 3),
        nn.ReLU(),
        nn.Linear(64, 10),
    ).eval()


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("affine", [False, True])
def test_fold_params_is_the_layer_then_the_batchnorm(bias: bool, affine: bool) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, bias=bias).double()
    bn = trained_bn(nn.BatchNorm2d(6, eps=1e-3, affine=affine)).double().eval()
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    w, b = fold_params(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
    torch.testing.assert_close(torch.nn.functional.conv2d(x, w, b), bn(conv(x)), rtol=1e-12, atol=1e-12)


def test_fold_keeps_the_function_and_removes_the_batchnorms() -> None:
    m = cnn()
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        before = m(x)
        assert fold_batchnorm(m) == {"1": "0", "4": "3"}
        after = m(x)
    assert not any(isinstance(mod, nn.BatchNorm2d) for mod in m.modules())
    assert isinstance(m[8], nn.BatchNorm1d)  # Linear → BatchNorm1d is not folded (see PAIRS)
    assert m[0].bias is not None and m[3].bias is not None  # added: the BatchNorm's shift lives there now
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)


class Tap(nn.Module):
    """The conv's output goes to the BatchNorm and to the residual sum: folding would change the sum."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = trained_bn(nn.BatchNorm2d(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y


class Twice(nn.Module):
    """One conv called twice, each call followed by its own BatchNorm: one weight cannot hold both."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn1, self.bn2 = trained_bn(nn.BatchNorm2d(4), 1), trained_bn(nn.BatchNorm2d(4), 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn1(self.conv(x)) + self.bn2(self.conv(x))


@pytest.mark.parametrize(
    "model",
    [
        Tap(),
        Twice(),
        nn.Sequential(trained_bn(nn.BatchNorm2d(3)), nn.Conv2d(3, 4, 3)),  # BatchNorm before the conv
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)),  # batch statistics
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), trained_bn(nn.BatchNorm2d(4))),  # a ReLU between
        nn.Sequential(nn.Conv2d(3, 6, 3), nn.Flatten(2), nn.Linear(16, 6), trained_bn(nn.BatchNorm1d(6))),
    ],
    ids=["output-used-twice", "conv-called-twice", "bn-first", "no-running-stats", "relu-between", "linear-3d"],
)
def test_unfoldable_pairs_are_left_alone(model: nn.Module) -> None:
    model.eval()
    x = torch.randn(2, 3 if isinstance(model, nn.Sequential) else 4, 6, 6)
    with torch.no_grad():
        before = model(x)
        assert fold_batchnorm(model) == {}
        assert torch.equal(model(x), before)


def test_a_damaged_batchnorm_is_left_alone() -> None:
    m = nn.Sequential(nn.Conv2d(3, 4, 3), trained_bn(nn.BatchNorm2d(4))).eval()
    with torch.no_grad():
        m[1].running_var[0] = -1.0  # var + eps < 0: no real factor
    assert fold_batchnorm(m) == {}
    assert isinstance(m[1], nn.BatchNorm2d)


class Untraceable(nn.Module):
    """Data-dependent control flow (torch.fx cannot trace it) around an nn.Sequential holding a conv and a
    BatchNorm: the module tree alone cannot tell whether the forward runs them as a pair, so nothing folds."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), trained_bn(nn.BatchNorm2d(4)), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body[0](x)  # the BatchNorm is skipped on this path
        return y * 2 if y.sum() > 0 else y


class Tied(nn.Module):
    """Two convs sharing one weight, each with its own BatchNorm: one weight cannot absorb two BatchNorms."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.b.weight = self.a.weight
        self.bn_a, self.bn_b = trained_bn(nn.BatchNorm2d(4), 1), trained_bn(nn.BatchNorm2d(4), 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn_a(self.a(x)) + self.bn_b(self.b(x))


class Alias(nn.Module):
    """One BatchNorm registered under two names (fx names it by the first, the forward calls the second)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), trained_bn(nn.BatchNorm2d(4))
        self.norm = self.bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class ReadsWeight(nn.Module):
    """The forward also reads the conv's weight and the BatchNorm's scale directly."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), trained_bn(nn.BatchNorm2d(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        return y + torch.nn.functional.conv2d(x, self.conv.weight, padding=1) * self.bn.weight.mean()


class Stores(nn.Module):
    """A forward that keeps its last output on the module (tracing must not leave a proxy there)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), trained_bn(nn.BatchNorm2d(4))
        self.last = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.last = self.bn(self.conv(x))
        return self.last


def weight_normed() -> nn.Module:
    conv = torch.nn.utils.parametrizations.weight_norm(nn.Conv2d(4, 4, 3, padding=1))
    return nn.Sequential(conv, trained_bn(nn.BatchNorm2d(4)))


def hooked() -> nn.Module:
    m = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), trained_bn(nn.BatchNorm2d(4)))
    m[0].register_forward_hook(lambda mod, inp, out: out.clamp(-0.1, 0.1))
    return m


class StdConv(nn.Conv2d):
    """A conv subclass whose forward standardizes its weight: scaling the stored weight would be undone."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = (self.weight - self.weight.mean((1, 2, 3), keepdim=True)) / self.weight.std((1, 2, 3), keepdim=True)
        return self._conv_forward(x, w, self.bias)


@pytest.mark.parametrize(
    "model",
    [
        Untraceable(),
        Tied(),
        Alias(),
        ReadsWeight(),
        weight_normed(),
        hooked(),
        nn.Sequential(StdConv(4, 4, 3, padding=1), trained_bn(nn.BatchNorm2d(4))),
    ],
    ids=["untraceable", "tied-weights", "aliased-bn", "reads-weight", "weight-norm", "hook", "subclass"],
)
def test_pairs_the_forward_does_not_run_as_one_are_left_alone(model: nn.Module) -> None:
    model.eval()
    x = torch.randn(2, 3 if isinstance(model, Untraceable) else 4, 6, 6)
    with torch.no_grad():
        before = model(x)
        assert fold_batchnorm(model) == {}
        assert torch.equal(model(x), before)


def test_a_batchnorm_in_training_mode_is_left_alone() -> None:
    m = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), trained_bn(nn.BatchNorm2d(4))).eval()
    m[1].train()  # it normalizes with batch statistics: no fixed affine map to fold
    assert fold_batchnorm(m) == {}
    assert fold_batchnorm(m.eval()) == {"1": "0"}


def test_tracing_leaves_no_proxy_on_the_model() -> None:
    m = Stores().eval()
    assert fold_batchnorm(m) == {"bn": "conv"}
    assert m.last is None


def test_compress_folds_by_default_and_the_recipe_can_keep_the_batchnorms() -> None:
    m = cnn()
    x = torch.randn(4, 3, 8, 8)
    q = lowbit.compress(m, "w8a8", progress=False)
    assert not any(isinstance(mod, nn.BatchNorm2d) for mod in q.modules())
    assert q.lowbit_folded_batchnorm == {"1": "0", "4": "3"}
    assert any(isinstance(mod, nn.BatchNorm2d) for mod in m.modules())  # the input model is untouched
    kept = load_recipe({**load_recipe("w8a8").to_dict(), "fold_batchnorm": False})
    k = lowbit.compress(m, kept, progress=False)
    assert sum(isinstance(mod, nn.BatchNorm2d) for mod in k.modules()) == 2
    with torch.no_grad():
        ref = m(x)
        for model in (q, k):
            assert torch.nn.functional.cosine_similarity(model(x).flatten(), ref.flatten(), dim=0) > 0.999


def test_fold_batchnorm_recipe_key() -> None:
    base = load_recipe("w4g128").to_dict()
    assert "fold_batchnorm" not in base  # the default is not written out
    off = Recipe.from_dict({**base, "fold_batchnorm": False})
    assert not off.fold_batchnorm and Recipe.from_yaml(off.to_yaml()) == off
    with pytest.raises(RecipeError, match="fold_batchnorm: expected true or false"):
        Recipe.from_dict({**base, "fold_batchnorm": "no"})


@pytest.mark.parametrize("packed", [False, True])
def test_folded_checkpoints_load_into_the_unfolded_architecture(tmp_path, packed: bool) -> None:
    m = cnn(bias=False)
    q = lowbit.compress(m, "w4g128", progress=False)
    if packed:
        q = lowbit.pack(q)
    lowbit.save(q, tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "lowbit.json").read_text())["format_version"] == 3
    loaded = lowbit.load(tmp_path / "ckpt", cnn(bias=False))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad(), use_mode("reference"):
        assert torch.equal(loaded(x), q(x))
    assert loaded.lowbit_folded_batchnorm == q.lowbit_folded_batchnorm


def test_a_malformed_folded_entry_is_refused(tmp_path) -> None:
    lowbit.save(lowbit.compress(cnn(), "w8a8", progress=False), tmp_path / "ckpt")
    spec_path = tmp_path / "ckpt" / "lowbit.json"
    spec = json.loads(spec_path.read_text())
    spec["folded_batchnorm"] = {"1": "no.such.layer"}
    spec_path.write_text(json.dumps(spec))
    with pytest.raises(CheckpointError, match="folded BatchNorm"):
        lowbit.load(tmp_path / "ckpt", cnn())
    spec["folded_batchnorm"] = {"2": "0"}  # a ReLU, not a BatchNorm
    spec_path.write_text(json.dumps(spec))
    with pytest.raises(CheckpointError, match="not the BatchNorm2d and Conv2d"):
        lowbit.load(tmp_path / "ckpt", cnn())
    spec["folded_batchnorm"] = ["1"]
    spec_path.write_text(json.dumps(spec))
    with pytest.raises(CheckpointError, match="folded_batchnorm"):
        lowbit.load(tmp_path / "ckpt", cnn())
