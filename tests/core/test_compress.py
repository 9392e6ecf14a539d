"""compress(): layer selection, surgery, activation calibration, bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowbit
from lowbit.errors import DataError, ModelError, RecipeError
from lowbit.formats import dequantize
from lowbit.nn import QuantConv2d, QuantLinear
from lowbit.recipe import PRESETS, Recipe

torch.manual_seed(0)


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.pw = nn.Conv2d(16, 32, 1)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(self.pw(torch.relu(self.dw(x))))
        x = nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)
        return self.head(torch.relu(self.fc1(x)))


class MyLinear(nn.Linear):
    """A subclass: must be compressed too."""


def _data(n: int = 4) -> list[torch.Tensor]:
    return [torch.randn(8, 1, 8, 8) for _ in range(n)]


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_compresses_a_cnn(preset: str) -> None:
    model = TinyCNN().eval()
    x = torch.randn(5, 1, 8, 8)
    q = lowbit.compress(model, preset, data=_data(), progress=False)
    assert isinstance(q.dw, QuantConv2d) and isinstance(q.fc1, QuantLinear)
    y = q(x)
    assert y.shape == (5, 10) and torch.isfinite(y).all()
    assert isinstance(model.fc1, nn.Linear)  # original untouched
    # stored weights dequantize to what the layer uses
    assert torch.equal(q.pw.weight_matrix(), dequantize(q.pw.qweight()))


def test_first_and_last_layers_stay_8bit_by_default() -> None:
    q = lowbit.compress(TinyCNN().eval(), "w2g64", progress=False)
    assert q.stem.weight_spec.bits == 8 and q.head.weight_spec.bits == 8
    assert q.dw.weight_spec.bits == 2
    r = Recipe.from_dict({"stages": [{"method": "rtn", "weights": "int2_g64", "keep_first_last": False}]})
    q2 = lowbit.compress(TinyCNN().eval(), r, progress=False)
    assert q2.stem.weight_spec.bits == 2


def test_subclass_and_grouped_conv_and_ignore() -> None:
    model = nn.Sequential(nn.Linear(8, 8), MyLinear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2))
    r = Recipe.from_dict(
        {"stages": [{"method": "rtn", "weights": "int4", "ignore": ["^2$"], "keep_first_last": False}]}
    )
    q = lowbit.compress(model, r, progress=False)
    assert isinstance(q[1], QuantLinear) and isinstance(q[2], nn.Linear) and not isinstance(q[2], QuantLinear)


def test_rtn_w8_is_close_and_w2_is_worse() -> None:
    model = TinyCNN().eval()
    x = torch.randn(16, 1, 8, 8)
    ref = model(x)
    err = {
        p: (lowbit.compress(model, p, progress=False)(x) - ref).pow(2).mean().item() for p in ("w8", "w4g128", "w2g64")
    }
    assert err["w8"] < err["w4g128"] < err["w2g64"]


def test_static_activations_need_data() -> None:
    with pytest.raises(DataError, match="calibration data"):
        lowbit.compress(TinyCNN().eval(), "w8a8-static", progress=False)
    q = lowbit.compress(TinyCNN().eval(), "w8a8-static", data=_data(), progress=False)
    assert q.fc1.act.calibrated and q.fc1.act.scale > 0


def test_bad_inputs() -> None:
    model = TinyCNN().eval()
    with pytest.raises(DataError, match="empty"):
        lowbit.compress(model, "w8a8-static", data=[], progress=False)
    with pytest.raises(DataError, match="NaN"):
        lowbit.compress(model, "w8a8-static", data=[torch.full((2, 1, 8, 8), float("nan"))], progress=False)
    bad = TinyCNN().eval()
    with torch.no_grad():
        bad.fc1.weight[0, 0] = float("nan")
    with pytest.raises(ModelError, match="fc1.weight"):
        lowbit.compress(bad, "w8", progress=False)
    r = {"stages": [{"method": "rtn", "weights": "int4", "targets": ["nosuchlayer"]}]}
    with pytest.raises(RecipeError, match="matches no layer"):
        lowbit.compress(model, r, progress=False)
    with pytest.raises(RecipeError, match="no option"):
        lowbit.compress(model, {"stages": [{"method": "rtn", "weights": "int4", "options": {"foo": 1}}]})


def test_static_activation_calibrators_differ_with_outliers() -> None:
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 4)).eval()
    data = [torch.randn(2048, 16) for _ in range(4)]  # 131k values: p99.99 ignores one outlier
    data[0][0, 0] = 500.0  # one planted outlier
    scales = {}
    for cal in ("minmax", "percentile", "mse"):
        r = {
            "stages": [
                {
                    "method": "rtn",
                    "weights": "int8",
                    "activations": "int8_static",
                    "calibrator": cal,
                    "keep_first_last": False,
                }
            ]
        }
        scales[cal] = lowbit.compress(model, r, data=data, progress=False)[0].act.scale.item()
    assert scales["percentile"] < scales["minmax"] / 10
