"""The sequential engine: block discovery, true-sequential groups, quantized inputs feed later layers."""

from __future__ import annotations

import torch
from torch import nn

from lowbit.calibration.collectors import HessianCollector, layer_input_matrix
from lowbit.calibration.sequential import SequentialHooks, find_blocks, run_sequential
from lowbit.compress import swap_layer
from lowbit.formats import FORMATS
from lowbit.methods.registry import LayerPlan
from lowbit.methods.rtn import rtn_quantize
from lowbit.recipe import Stage


class Block(nn.Module):
    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        a = torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2) * scale, dim=-1) @ self.v(x)
        x = x + self.o(a)
        return (x + self.fc2(torch.relu(self.fc1(x))),)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.layers = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for layer in self.layers:
            h = layer(h, scale=0.25)[0]
        return self.head(h.mean(1))


def _run(model: nn.Module, names: list[str]) -> tuple[list[list[str]], dict[str, int]]:
    stage = Stage(method="rtn", weights=FORMATS["int4"])
    plan = [LayerPlan(n, model.get_submodule(n), FORMATS["int4"], None) for n in names]
    groups: list[list[str]] = []
    seen: dict[str, int] = {}

    def quantize_group(group: list[LayerPlan], collectors: dict) -> None:
        groups.append([p.name for p in group])
        for p in group:
            seen[p.name] = collectors[p.name].n
            swap_layer(model, p, rtn_quantize(p.module.weight, p.weights), stage)

    batches = [torch.randn(2, 5, 8) for _ in range(3)]
    run_sequential(
        model,
        plan,
        batches,
        SequentialHooks(lambda p: HessianCollector(p.module), quantize_group),
        progress=False,
        log=lambda s: None,
    )
    return groups, seen


def test_blocks_and_true_sequential_groups() -> None:
    torch.manual_seed(0)
    model = Tiny().eval()
    assert [n for n, _ in find_blocks(model)] == ["layers.0", "layers.1"]
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    groups, seen = _run(model, names)
    assert groups[0] == ["embed"]
    assert groups[1] == ["layers.0.q", "layers.0.k", "layers.0.v"]
    assert groups[2:5] == [["layers.0.o"], ["layers.0.fc1"], ["layers.0.fc2"]]
    assert groups[-1] == ["head"]
    assert all(v == 30 for k, v in seen.items() if k != "head") and seen["head"] == 6


def test_later_layers_see_quantized_inputs() -> None:
    torch.manual_seed(0)
    model = Tiny().eval()
    ref = Tiny().eval()
    ref.load_state_dict(model.state_dict())
    x = torch.randn(2, 5, 8)
    captured = {}
    names = ["layers.0.q", "layers.0.k", "layers.0.v", "layers.0.o", "layers.0.fc1", "layers.0.fc2", "layers.1.q"]
    h = model.layers[1].q.register_forward_pre_hook(lambda m, a: captured.setdefault("in", a[0]))
    _run(model, names)
    h.remove()
    with torch.no_grad():
        float_in = ref.layers[0](ref.embed(x), scale=0.25)[0]
        quant_in = model.layers[0](model.embed(x), scale=0.25)[0]
    assert not torch.allclose(float_in, quant_in)  # block 0 was quantized before block 1 was calibrated


def test_model_without_blocks_uses_full_passes() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).eval()
    assert find_blocks(model) == [("", model)]
    plan = [LayerPlan("0", model[0], FORMATS["int8"], None), LayerPlan("3", model[3], FORMATS["int8"], None)]
    order = []

    def qg(group, collectors) -> None:
        order.append([p.name for p in group])
        assert collectors[group[0].name].hessian().shape[0] == group[0].module.weight[0].numel()

    run_sequential(
        model,
        plan,
        [torch.randn(2, 1, 8, 8)],
        SequentialHooks(lambda p: HessianCollector(p.module), qg),
        progress=False,
        log=lambda s: None,
    )
    assert order == [["0"], ["3"]]


def test_conv_input_matrix_matches_conv() -> None:
    conv = nn.Conv2d(3, 4, 3, padding=1, stride=2)
    x = torch.randn(2, 3, 9, 9)
    cols = layer_input_matrix(conv, x).float()
    y = cols @ conv.weight.reshape(4, -1).T + conv.bias
    assert torch.allclose(y.reshape(2, -1, 4).transpose(1, 2).reshape(2, 4, 5, 5), conv(x), atol=1e-5)
