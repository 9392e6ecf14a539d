"""`LayerDispatch.dense`: the dense path of a layer with dynamic per-token activations, in its fewest steps."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowbit
from lowbit.formats import ACT_FORMATS, FORMATS
from lowbit.kernels import native
from lowbit.kernels.dispatch import use_mode
from lowbit.recipe import Recipe, Stage

pytestmark = pytest.mark.skipif(not native.available(), reason="no native kernels: layers have no dispatch")


@pytest.mark.parametrize(
    ("weights", "acts"), [("int8", "int8_token"), ("fp8_e4m3", "fp8_token"), ("int4_g32", "int8_token")]
)
def test_dense_path_quantizes_the_input_in_c_and_equals_the_simulated_layer(weights: str, acts: str) -> None:
    """One C pass of the activation quantizer and one F.linear on the cached weight: the simulated layer's output bit
    for bit (FP8 included: its dense call used to run the module's full Python forward)."""
    torch.manual_seed(0)
    recipe = Recipe(stages=(Stage(method="rtn", weights=FORMATS[weights], activations=ACT_FORMATS[acts]),))
    q = lowbit.compress(nn.Sequential(nn.Linear(96, 24)), recipe, progress=False)
    p = lowbit.pack(q)
    x = torch.randn(5, 96)
    x[2, 3] = float("nan")
    with torch.no_grad(), use_mode("native"):
        p(x)  # builds the dispatch
    disp = p[0]._dispatch
    assert disp.fast_input is not None and not disp.plain

    def fail() -> torch.Tensor:
        raise AssertionError("the full forward ran")

    with torch.no_grad():
        got, want = disp.dense(p[0], x, x, fail), q(x)
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
