"""`pack(model)`: turn a compressed (simulated) model into bit-packed storage with identical outputs.

Example:
    >>> import torch
    >>> from torch import nn
    >>> import lowbit
    >>> m = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 2))
    >>> p = lowbit.pack(lowbit.compress(m, "ternary", progress=False))
    >>> type(p[1]).__name__
    'PackedLinear'
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from lowbit.compress import quant_layers, set_submodule
from lowbit.nn.fused_blocks import BLOCKS, fuse_encoder_blocks
from lowbit.nn.hf_attention import use_lowbit_attention
from lowbit.nn.packed import PackedConv2d, PackedLinear, PackedMixin, zero_format_of
from lowbit.nn.qlayers import QuantConv2d, QuantLayer, QuantLinear


def pack_layer(layer: QuantLayer) -> QuantLayer:
    """The packed twin of one quantized layer (float-weight layers are returned unchanged)."""
    if layer.weight_spec is None or isinstance(layer, PackedMixin):
        return layer
    zf = zero_format_of(layer)
    common = {
        "weight_spec": layer.weight_spec,
        "act_spec": layer.act_spec,
        "zero_format": zf,
        **({"calibrator": layer.act.calibrator, "percentile": layer.act.percentile} if layer.act else {}),
    }
    if isinstance(layer, QuantConv2d):
        new: QuantLayer = PackedConv2d(
            layer.in_channels,
            layer.out_channels,
            layer.kernel_size,
            layer.stride,
            layer.padding,
            layer.dilation,
            layer.groups,
            layer.bias is not None,
            **common,
        )
    else:
        assert isinstance(layer, QuantLinear)
        new = PackedLinear(layer.in_features, layer.out_features, layer.bias is not None, **common)
    if layer.input_scale is not None:
        new.set_input_scale(layer.input_scale)
    if layer.input_shift is not None:
        new.set_input_shift(layer.input_shift)
    state = {k: v for k, v in layer.state_dict().items()}
    with torch.no_grad():
        new.load_state_dict(state, strict=False)
        new.scale.copy_(layer.scale)
        if layer.zero is not None:
            new.zero.copy_(layer.zero)
        new._pack_from_storage(layer.codes)  # type: ignore[attr-defined]
        new._unpack_into_storage()  # type: ignore[attr-defined]
    return new


KERNEL_ACTIVATIONS = ("exact", "int8")


#: ``pack``'s ``attention``: lowbit's fp32 attention kernel for transformers models' SDPA attention, or as it is.
ATTENTION = ("lowbit", "keep")


def pack(
    model: nn.Module, *, kernel_activations: str = "exact", attention: str = "lowbit", blocks: str = "fused"
) -> nn.Module:
    """A deep copy of ``model`` with every quantized layer bit-packed, in eval mode with its parameters frozen:
    a packed model is an inference artifact, and its layers run native kernels only where no gradient is
    wanted (`lowbit.kernels.dispatch`).

    ``kernel_activations="int8"`` lets weight-only int and binary layers quantize their input per token to int8
    inside the native kernel (ONNX Runtime's ``accuracy_level=4``), and in the dense path dispatch may pick instead,
    so the outputs do not depend on that choice: much faster on CPUs, but they differ from the simulated model by
    that rounding (``LOWBIT_KERNELS=reference`` still computes the simulated model); the default ``"exact"``
    computes what the simulated model computes. `set_kernel_activations` changes it later.

    ``attention="lowbit"`` runs the SDPA attention of the transformers models inside on lowbit's fp32 kernel
    (`lowbit.nn.hf_attention`; the same outputs within float rounding, faster on short sequences); ``"keep"``
    leaves it as it is.

    ``blocks="fused"`` gives the BERT-style encoder blocks inside one lean forward each (`lowbit.nn.fused_blocks`:
    the same layers and kernels with a fraction of the Python and operator calls, a native GELU and residual add +
    LayerNorm; checked against the block's own forward on a probe input); ``"keep"`` leaves them as they are."""
    if attention not in ATTENTION:
        raise ValueError(f"attention must be one of {', '.join(ATTENTION)}, got {attention!r}")
    if blocks not in BLOCKS:
        raise ValueError(f"blocks must be one of {', '.join(BLOCKS)}, got {blocks!r}")
    packed = copy.deepcopy(model)
    for name, layer in quant_layers(packed):
        set_submodule(packed, name, pack_layer(layer))
    set_kernel_activations(packed, kernel_activations)
    if attention == "lowbit":
        use_lowbit_attention(packed)
    packed.eval().requires_grad_(False)
    if blocks == "fused":
        fuse_encoder_blocks(packed)
    return packed


def set_kernel_activations(model: nn.Module, value: str) -> nn.Module:
    """Set how the packed layers of ``model`` feed weight-only native kernels: ``"exact"`` or ``"int8"``."""
    if value not in KERNEL_ACTIVATIONS:
        raise ValueError(f"kernel_activations must be one of {', '.join(KERNEL_ACTIVATIONS)}, got {value!r}")
    for layer in model.modules():
        if isinstance(layer, PackedMixin):
            layer.kernel_activations = value  # type: ignore[assignment]
            layer._dispatch = False  # type: ignore[assignment]  # route and timings are re-derived
    return model
