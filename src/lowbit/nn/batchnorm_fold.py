"""Fold inference-mode BatchNorm into the convolution that feeds it.

A ``Conv2d → BatchNorm2d`` pair computes, in eval mode, an affine map per output channel
after the layer: ``bn(y) = (y − μ) · γ / √(σ² + ε) + β``. Folding it into the layer's weight and bias gives one layer
computing the same function (within float rounding) and removes a whole operator from every forward. `compress` does
this before quantizing (``Recipe.fold_batchnorm``, default on), as deployment runtimes do: the weights that get
quantized are the ones that run, per-channel scales absorb the BatchNorm's factors, and a packed CNN runs one layer
where it ran a layer and a BatchNorm.

Pairs are found on the model's traced graph (`torch.fx`): the BatchNorm's only input is the conv's output, and that
output goes nowhere else. Only plain ``nn.Conv2d`` / ``nn.BatchNorm2d`` modules fold (no subclasses, parametrizations
or hooks), each called once, registered once, read by nothing else, sharing no parameter; a BatchNorm without running
statistics or in training mode is left alone, and so is every pair of a model that does not trace (a guess from the
module tree could fold a pair the forward does not run as one).

Example:
    >>> import torch
    >>> from torch import nn
    >>> m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval()
    >>> _ = m[1].running_mean.uniform_(-1, 1), m[1].running_var.uniform_(0.5, 2)
    >>> x = torch.randn(2, 3, 8, 8)
    >>> before = m(x)
    >>> fold_batchnorm(m)
    {'1': '0'}
    >>> type(m[1]).__name__, bool(torch.allclose(m(x), before, atol=1e-5))
    ('Identity', True)
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn
from torch.nn.utils import parametrize

#: (layer type, the BatchNorm type that may follow it). Not ``Linear → BatchNorm1d``: on a 3-D input (N, C, L) the
#: BatchNorm's channels are dim 1 but a Linear's outputs are the last dim, which the graph alone does not tell apart.
PAIRS: tuple[tuple[type[nn.Module], type[nn.Module]], ...] = ((nn.Conv2d, nn.BatchNorm2d),)


def fold_params(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    var: torch.Tensor,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of a layer (output channels first in ``weight``) followed by an eval-mode BatchNorm:
    ``W' = W · a`` and ``b' = (b − μ) · a + β`` per output channel, with ``a = γ / √(σ² + ε)``. Computed in float64,
    returned in the weight's dtype.

    >>> w, b = fold_params(torch.ones(2, 3), None, torch.tensor([1.0, 0.0]), torch.tensor([3.0, 0.0]),
    ...                    torch.tensor([2.0, 1.0]), torch.tensor([0.0, 5.0]), eps=1.0)
    >>> w.tolist(), b.tolist()
    ([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]], [-1.0, 5.0])
    """
    a = torch.rsqrt(var.double() + eps)
    if gamma is not None:
        a = a * gamma.double()
    b = -mean.double() if bias is None else bias.double() - mean.double()
    b = b * a + (beta.double() if beta is not None else 0.0)
    shape = (-1,) + (1,) * (weight.dim() - 1)
    return (weight.double() * a.reshape(shape)).to(weight.dtype), b.to(weight.dtype)


def _plain(module: nn.Module, kind: type[nn.Module]) -> bool:
    """Exactly ``kind`` (no subclass: its forward may not read ``weight`` as stored), without parametrizations
    (weight norm, spectral norm: ``weight`` is computed) or hooks (they would act on the other side of the fold)."""
    hooks = (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks)
    return type(module) is kind and not parametrize.is_parametrized(module) and not any(hooks)


def _foldable(layer: nn.Module, bn: nn.Module) -> bool:
    if not any(_plain(layer, lt) and _plain(bn, bt) for lt, bt in PAIRS):
        return False
    assert isinstance(bn, nn.BatchNorm2d) and isinstance(layer, nn.Conv2d)
    stats = bn.running_mean is not None and bn.running_var is not None
    return stats and not bn.training and bn.num_features == layer.out_channels


def foldable_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """Names of the (conv, BatchNorm) pairs `fold_batchnorm` folds, from the traced graph (none when the model does
    not trace). A pair folds when the BatchNorm's only input is the conv's output, used nowhere else; each module is
    called once, registered under one name, read by nothing else (no ``get_attr`` of it or its tensors), and shares
    no parameter with another module."""
    owners = _attribute_owners(model)
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # any tracing failure (data-dependent control flow, unsupported ops): nothing folds
        return []
    finally:
        _restore_attributes(owners)
    calls = Counter(str(n.target) for n in graph.nodes if n.op == "call_module")
    read = {str(n.target) for n in graph.nodes if n.op == "get_attr"}
    names = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    params = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))

    def alone(name: str) -> bool:
        module = model.get_submodule(name)
        if calls[name] != 1 or names[id(module)] != 1 or any(r == name or r.startswith(name + ".") for r in read):
            return False
        return all(params[id(p)] == 1 for p in module.parameters())

    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        src = node.args[0]
        if not isinstance(src, torch.fx.Node) or src.op != "call_module" or len(src.users) != 1:
            continue
        layer_name, bn_name = str(src.target), str(node.target)
        if alone(layer_name) and alone(bn_name):
            if _foldable(model.get_submodule(layer_name), model.get_submodule(bn_name)):
                pairs.append((layer_name, bn_name))
    return pairs


def _attribute_owners(model: nn.Module) -> list[tuple[nn.Module, dict]]:
    """Every module's plain attributes: tracing runs the forward's Python code on symbolic values, and a forward
    that stores something on its module (``self.last = y``) would leave a proxy there."""
    return [(m, dict(vars(m))) for m in model.modules()]


def _restore_attributes(owners: list[tuple[nn.Module, dict]]) -> None:
    for module, attrs in owners:
        state = vars(module)
        for key in [k for k in state if k not in attrs]:
            del state[key]
        state.update(attrs)


def fold_batchnorm(model: nn.Module) -> dict[str, str]:
    """Fold every foldable eval-mode BatchNorm of ``model`` into the convolution before it, in place: the layer gets the
    folded weight and bias (a bias parameter is added if it had none), the BatchNorm becomes ``nn.Identity``.
    Returns ``{batchnorm name: layer name}`` (`lowbit.save` records it, `lowbit.load` rebuilds the structure)."""
    from lowbit.compress import set_submodule  # local: compress imports this module

    folded: dict[str, str] = {}
    for layer_name, bn_name in foldable_pairs(model):
        layer, bn = model.get_submodule(layer_name), model.get_submodule(bn_name)
        assert isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.running_mean is not None
        assert bn.running_var is not None
        with torch.no_grad():
            w, b = fold_params(
                layer.weight, layer.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias, float(bn.eps)
            )
            if not (torch.isfinite(w).all() and torch.isfinite(b).all()):
                continue  # a damaged BatchNorm (negative variance, Inf): leave the pair as it is
            layer.weight.copy_(w)
            if layer.bias is None:
                layer.bias = nn.Parameter(b, requires_grad=layer.weight.requires_grad)
            else:
                layer.bias.copy_(b)
        set_submodule(model, bn_name, nn.Identity())
        folded[bn_name] = layer_name
    return folded


def rebuild_folded(model: nn.Module, folded: dict[str, str]) -> None:
    """Give a freshly built float model the structure `fold_batchnorm` left (for loading a checkpoint): each
    folded BatchNorm becomes ``nn.Identity`` and its layer gets a bias parameter if it had none (the checkpoint's
    values are loaded over both)."""
    from lowbit.compress import set_submodule  # local: compress imports this module

    for bn_name, layer_name in folded.items():
        layer, bn = model.get_submodule(layer_name), model.get_submodule(bn_name)
        if isinstance(layer, nn.Conv2d) and isinstance(bn, nn.Identity) and layer.bias is not None:
            continue  # folded already
        if not isinstance(layer, nn.Conv2d) or not isinstance(bn, nn.BatchNorm2d):
            raise TypeError(
                f"'{bn_name}' / '{layer_name}' are a {type(bn).__name__} and a {type(layer).__name__}, "
                "not the BatchNorm2d and Conv2d that were folded"
            )
        if layer.bias is None:
            w = layer.weight
            layer.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device), w.requires_grad)
        set_submodule(model, bn_name, nn.Identity())
