"""Where transformer encoder block families keep their parts, for `lowbit.nn.fused_blocks`.

A `Layout` names, as dotted paths from the block, the query / key / value projections (or their one joint layer), the
attention output projection, the two LayerNorms, the feed-forward layers and activation (or the function it calls),
the module holding the head count, and whether the block normalises before (pre-norm: ViT) or after (post-norm:
BERT) each residual. `encoder_parts` matches a block against `LAYOUTS` and checks the shapes agree; whether the lean
forward computes what the block computes is checked on a probe input by `fuse_encoder_blocks`.

Example:
    >>> from torch import nn
    >>> from lowbit.nn.block_layouts import encoder_parts
    >>> encoder_parts(nn.Linear(4, 4)) is None
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
from torch import nn

#: The parts a layout may name, in the order `Layout.slots` lists them.
ROLES = ("query", "key", "value", "qkv", "attn_out", "norm1", "fc1", "act", "fc2", "norm2")


@dataclass(frozen=True)
class Layout:
    """One block family: dotted paths from the block to its parts."""

    name: str
    attn_out: str
    norm1: str
    fc1: str
    fc2: str
    norm2: str
    attention: str  # the module holding the head count (and the head size, where it has one)
    heads_attr: str
    head_dim_attr: str | None = None  # None: the projections' width // heads
    query: str = ""
    key: str = ""
    value: str = ""
    act: str = ""
    chunking: str = ""  # the module whose ``chunk_size_feed_forward`` must be 0, where the family has one
    pre_norm: bool = False
    qkv: str = ""  # query, key and value as one layer already (instead of ``query`` / ``key`` / ``value``)
    act_fn: str = ""  # the activation where the block calls a function, not a module: "gelu"
    # Only the one C call (`lowbit.nn.fused_blocks`): the block's own forward is already lean, so the Python path
    # would not be faster; where the C call cannot run, the block's own forward does.
    c_only: bool = False

    def slots(self) -> dict[str, str]:
        """The parts by role."""
        return {r: getattr(self, r) for r in ROLES if getattr(self, r)}


#: The block families `lowbit.nn.fused_blocks` recognises.
LAYOUTS = (
    Layout(  # transformers' BERT, RoBERTa, MiniLM, ELECTRA, ... (post-norm)
        name="bert",
        query="attention.self.query",
        key="attention.self.key",
        value="attention.self.value",
        attn_out="attention.output.dense",
        norm1="attention.output.LayerNorm",
        fc1="intermediate.dense",
        act="intermediate.intermediate_act_fn",
        fc2="output.dense",
        norm2="output.LayerNorm",
        attention="attention.self",
        heads_attr="num_attention_heads",
        head_dim_attr="attention_head_size",
    ),
    Layout(  # transformers' DistilBERT (post-norm)
        name="distilbert",
        query="attention.q_lin",
        key="attention.k_lin",
        value="attention.v_lin",
        attn_out="attention.out_lin",
        norm1="sa_layer_norm",
        fc1="ffn.lin1",
        act="ffn.activation",
        fc2="ffn.lin2",
        norm2="output_layer_norm",
        attention="attention",
        heads_attr="n_heads",
        chunking="ffn",
    ),
    Layout(  # lowbit's own ViT block (lowbit.zoo.vit.Block: the digits / Fashion-MNIST ViTs; pre-norm)
        name="lowbit-vit",
        qkv="attn.qkv",
        attn_out="attn.proj",
        norm1="norm1",
        fc1="fc1",
        fc2="fc2",
        norm2="norm2",
        attention="attn",
        heads_attr="heads",
        pre_norm=True,
        act_fn="gelu",
        c_only=True,
    ),
    Layout(  # transformers 5's ViT (pre-norm)
        name="vit",
        query="attention.q_proj",
        key="attention.k_proj",
        value="attention.v_proj",
        attn_out="attention.o_proj",
        norm1="layernorm_before",
        fc1="mlp.fc1",
        act="mlp.activation_fn",
        fc2="mlp.fc2",
        norm2="layernorm_after",
        attention="attention",
        heads_attr="num_attention_heads",
        head_dim_attr="head_dim",
        pre_norm=True,
    ),
)


@dataclass
class EncoderParts:
    """One recognised block: its layout, parts by role, and the attention constants."""

    layout: Layout
    mods: dict[str, nn.Module]
    heads: int
    head_dim: int
    scale: float
    act_kind: str | None  # "gelu" / "gelu_tanh" / "relu": computed natively; None: call the activation module


def get_module(root: nn.Module, path: str | tuple[str, ...]) -> nn.Module | None:
    """The submodule at dotted ``path`` (or its names, already split) through ``_modules`` (None if absent): a few
    dict lookups."""
    m: Any = root
    for key in path.split(".") if isinstance(path, str) and path else path:
        m = m._modules.get(key) if isinstance(m, nn.Module) else None
        if m is None:
            return None
    return m


def act_kind(act: nn.Module) -> str | None:
    """``"gelu"`` / ``"gelu_tanh"`` / ``"relu"`` where ``act`` is that function (PyTorch's or transformers'
    classes), else None."""
    if isinstance(act, nn.GELU):
        return "gelu" if act.approximate == "none" else "gelu_tanh"
    if type(act) is nn.ReLU:
        return "relu"
    name = type(act).__name__
    fn = getattr(act, "act", None)
    if name == "GELUActivation" and fn is F.gelu:
        return "gelu"
    if name in ("GELUTanh", "PytorchGELUTanh") and getattr(fn, "keywords", {}).get("approximate") == "tanh":
        return "gelu_tanh"
    return None


def _linear_like(m: Any, n_in: int | None = None) -> bool:
    return isinstance(m, nn.Module) and hasattr(m, "in_features") and (n_in is None or m.in_features == n_in)


def _heads(att: nn.Module, layout: Layout, width: int) -> tuple[int, int] | None:
    """(heads, head size) from the attention module, or None."""
    try:
        heads = int(getattr(att, layout.heads_attr))
        head_dim = int(getattr(att, layout.head_dim_attr)) if layout.head_dim_attr else width // heads
    except (AttributeError, TypeError, ValueError, ZeroDivisionError):
        return None
    return (heads, head_dim) if heads > 0 and head_dim > 0 else None


def _parts_of(block: nn.Module, layout: Layout) -> EncoderParts | None:
    mods = {role: get_module(block, path) for role, path in layout.slots().items()}
    att = get_module(block, layout.attention)
    if att is None or any(m is None for m in mods.values()):
        return None
    width = getattr(mods["qkv"], "out_features", 0) // 3 if layout.qkv else getattr(mods["query"], "out_features", 0)
    hd = _heads(att, layout, int(width))
    if hd is None:
        return None
    heads, head_dim = hd
    if getattr(block, "is_decoder", False) or getattr(block, "add_cross_attention", False):
        return None
    if layout.chunking and getattr(get_module(block, layout.chunking), "chunk_size_feed_forward", 0):
        return None
    if getattr(block, "chunk_size_feed_forward", 0):
        return None
    if getattr(att, "position_embedding_type", "absolute") != "absolute" or getattr(att, "is_causal", False):
        return None
    if not all(isinstance(mods[n], nn.LayerNorm) and len(mods[n].normalized_shape) == 1 for n in ("norm1", "norm2")):
        return None
    d = heads * head_dim
    for role, out in (("qkv", 3 * d),) if layout.qkv else (("query", d), ("key", d), ("value", d)):
        if not _linear_like(mods[role], d) or mods[role].out_features != out:  # type: ignore[union-attr]
            return None
    if not (_linear_like(mods["attn_out"], d) and _linear_like(mods["fc1"], d) and _linear_like(mods["fc2"])):
        return None
    scale = float(getattr(att, "scaling", head_dim**-0.5))
    kind = layout.act_fn or act_kind(mods["act"])  # type: ignore[arg-type]
    return EncoderParts(layout, mods, heads, head_dim, scale, kind)


def encoder_parts(block: nn.Module) -> EncoderParts | None:
    """The parts of ``block`` if it is a plain encoder block of a known layout (self-attention only, absolute
    positions, no feed-forward chunking), else None."""
    for layout in LAYOUTS:
        parts = _parts_of(block, layout)
        if parts is not None:
            return parts
    return None
