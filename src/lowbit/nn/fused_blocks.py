"""Transformer encoder blocks run as one lean forward: fewer Python and operator calls per block.

A Hugging Face BERT-style block (BERT, RoBERTa, MiniLM, ... : ``attention.self.{query,key,value}``,
``attention.output.{dense,LayerNorm}``, ``intermediate.{dense,intermediate_act_fn}``, ``output.{dense,LayerNorm}``)
calls about 15 modules, 3 dropouts, a chunking helper that inspects a signature, an attention-function lookup and
some 50 tensor operations per forward. At batch 1 on a CPU those calls cost as much as the block's int8 matrix
products. `fuse_encoder_blocks` gives each such block a forward that computes the same thing with its own layers
(packed or not, so dispatch still picks each layer's kernel): the query / key / value products, lowbit's attention
kernel (`lowbit.kernels.attention.sdpa`) on strided views (the query / key / value layers concatenated into one
where that is exact, `lowbit.nn.concat`), the output product, one pass for residual add +
LayerNorm (`lowbit.kernels.elementwise.add_layer_norm`), the feed-forward with a native GELU
(`lowbit.kernels.elementwise.gelu`), and the second residual add + LayerNorm.

Nothing in the module tree or the state dict changes: the block keeps its submodules and gets an instance
``forward``. That forward hands the call to the block's own class forward whenever anything is outside the plain
encoder case: training, autograd on the input, tracing / compiling / exporting, hooks on a bypassed submodule
(transformers records attention weights that way), cross-attention inputs, a cache, or any other argument that is
set. When fusing, each block is checked on a probe input (with and without a padding mask) against its own forward
and left as it is if the outputs differ; `lowbit.pack` fuses by default (``blocks="fused"``), as `lowbit.io.load`
does for a packed checkpoint, and ``lowbit.pack(..., blocks="keep")`` leaves the blocks alone.

Example:
    >>> from torch import nn
    >>> from lowbit.nn.fused_blocks import fuse_encoder_blocks
    >>> fuse_encoder_blocks(nn.Sequential(nn.Linear(4, 4)))  # no encoder block inside: nothing fused
    0
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.kernels.attention import sdpa
from lowbit.kernels.elementwise import add_layer_norm, gelu
from lowbit.nn.concat import concat_linears

log = logging.getLogger(__name__)

#: The choices of `lowbit.pack`'s ``blocks`` argument.
BLOCKS = ("fused", "keep")
PROBE_ATOL = 1e-4


@dataclass
class EncoderParts:
    """The submodules and constants of one BERT-style block a fused forward needs."""

    query: nn.Module
    key: nn.Module
    value: nn.Module
    attn_out: nn.Module
    norm1: nn.LayerNorm
    fc1: nn.Module
    act: nn.Module
    fc2: nn.Module
    norm2: nn.LayerNorm
    heads: int
    head_dim: int
    scale: float
    gelu: str | None  # "none" / "tanh": the activation is that GELU, computed natively; None: call `act`


def _linear_like(m: Any, n_in: int | None = None) -> bool:
    return isinstance(m, nn.Module) and hasattr(m, "in_features") and (n_in is None or m.in_features == n_in)


def _gelu_kind(act: nn.Module) -> str | None:
    """``"none"`` / ``"tanh"`` where ``act`` is that GELU (PyTorch's or transformers' classes), else None."""
    if isinstance(act, nn.GELU):
        return act.approximate
    name = type(act).__name__
    fn = getattr(act, "act", None)
    if name == "GELUActivation" and fn is F.gelu:
        return "none"
    if name in ("GELUTanh", "PytorchGELUTanh") and getattr(fn, "keywords", {}).get("approximate") == "tanh":
        return "tanh"
    return None


def encoder_parts(block: nn.Module) -> EncoderParts | None:
    """The parts of ``block`` if it is a plain BERT-style encoder block (self-attention only, absolute positions,
    no feed-forward chunking, LayerNorm after each residual), else None."""
    try:
        att = block.attention  # type: ignore[union-attr]
        sa, so = att.self, att.output
        inter, out = block.intermediate, block.output  # type: ignore[union-attr]
        parts = EncoderParts(
            query=sa.query,
            key=sa.key,
            value=sa.value,
            attn_out=so.dense,
            norm1=so.LayerNorm,
            fc1=inter.dense,
            act=inter.intermediate_act_fn,
            fc2=out.dense,
            norm2=out.LayerNorm,
            heads=int(sa.num_attention_heads),
            head_dim=int(sa.attention_head_size),
            scale=float(getattr(sa, "scaling", int(sa.attention_head_size) ** -0.5)),
            gelu=None,
        )
    except (AttributeError, TypeError):
        return None
    if getattr(block, "is_decoder", False) or getattr(block, "add_cross_attention", False):
        return None
    if getattr(block, "chunk_size_feed_forward", 0) or getattr(sa, "position_embedding_type", "absolute") != "absolute":
        return None
    if not all(isinstance(n, nn.LayerNorm) and len(n.normalized_shape) == 1 for n in (parts.norm1, parts.norm2)):
        return None
    d = parts.heads * parts.head_dim
    shapes = [(parts.query, d), (parts.key, d), (parts.value, d), (parts.attn_out, d), (parts.fc2, None)]
    if not all(_linear_like(m, n) for m, n in shapes) or not _linear_like(parts.fc1, d):
        return None
    if not isinstance(parts.act, nn.Module):
        return None
    parts.gelu = _gelu_kind(parts.act)
    return parts


def _is_set(v: Any) -> bool:
    return v is not None and v is not False


class FusedEncoderForward:
    """The instance ``forward`` `fuse_encoder_blocks` gives a block: the lean path, or the block's own forward.

    The submodules are looked up in the block at every call (a few dict lookups), so a layer swapped in later
    (``lowbit.compress`` / ``lowbit.pack`` on a fused model) is the one that runs."""

    def __init__(self, block: nn.Module, parts: EncoderParts, returns_tuple: bool) -> None:
        self.block, self.returns_tuple = block, returns_tuple
        self.heads, self.head_dim, self.scale = parts.heads, parts.head_dim, parts.scale
        self.act, self.gelu = parts.act, parts.gelu
        self._qkv_src: tuple[nn.Module, ...] = ()
        self._qkv: nn.Module | None = None

    def qkv(self, sam: dict[str, Any]) -> nn.Module | None:
        """One layer for the query, key and value products (`lowbit.nn.concat`), rebuilt when one of them was
        swapped; None where they cannot be concatenated exactly (then they run one by one)."""
        src = (sam["query"], sam["key"], sam["value"])
        if len(self._qkv_src) != 3 or any(a is not b for a, b in zip(src, self._qkv_src, strict=True)):
            self._qkv_src, self._qkv = src, concat_linears(src)
        return self._qkv

    def original(self, *args: Any, **kwargs: Any) -> Any:
        return type(self.block).forward(self.block, *args, **kwargs)

    def __call__(self, hidden_states: torch.Tensor, attention_mask: Any = None, *args: Any, **kwargs: Any) -> Any:
        x = hidden_states
        plain = not self.block.training and not any(_is_set(a) for a in args)
        plain = plain and not any(_is_set(v) for v in kwargs.values())
        plain = plain and (attention_mask is None or isinstance(attention_mask, torch.Tensor))
        plain = plain and isinstance(x, torch.Tensor) and x.dim() == 3
        plain = plain and not (x.requires_grad and torch.is_grad_enabled())
        if not plain or torch.jit.is_tracing() or torch.compiler.is_compiling():
            return self.original(hidden_states, attention_mask, *args, **kwargs)
        y = self.lean(x, attention_mask)
        if y is None:  # hooks on a bypassed module
            return self.original(hidden_states, attention_mask, *args, **kwargs)
        return (y,) if self.returns_tuple else y

    def lean(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
        """The block's output for hidden states ``x`` (B, L, D) and an additive float or boolean attention mask;
        None when a module the lean path does not call has hooks."""
        m = self.block._modules
        att, inter, out = m["attention"], m["intermediate"], m["output"]
        sa, so = att._modules["self"], att._modules["output"]
        act = inter._modules["intermediate_act_fn"]
        for mod in (att, sa, so, inter, out, act):
            if mod._forward_hooks or mod._forward_pre_hooks:
                return None
        sam, som, outm = sa._modules, so._modules, out._modules
        b, n, d = x.shape[0], x.shape[1], self.heads * self.head_dim
        heads = (b, n, self.heads, self.head_dim)
        qkv = self.qkv(sam)
        if qkv is not None:
            y = qkv(x)  # (B, L, 3D): strided views for the attention kernel
            q, k, v = (y[..., i * d : (i + 1) * d].view(heads).transpose(1, 2) for i in range(3))
        else:
            q, k, v = (sam[name](x).view(heads).transpose(1, 2) for name in ("query", "key", "value"))
        a = sdpa(q, k, v, mask, scale=self.scale).reshape(b, n, d)
        h = add_layer_norm(som["dense"](a), x, som["LayerNorm"])
        f = inter._modules["dense"](h)
        f = gelu(f, self.gelu) if self.gelu is not None and act is self.act else act(f)
        return add_layer_norm(outm["dense"](f), h, outm["LayerNorm"])


def _probe_ok(block: nn.Module, fused: FusedEncoderForward, d: int) -> tuple[bool, bool]:
    """(outputs agree, the block's forward returns a tuple) on a seeded probe, without and with a padding mask."""
    from lowbit.kernels.dispatch import use_mode

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, d, generator=gen)
    pad = torch.zeros(2, 1, 1, 7)
    pad[1, ..., 5:] = torch.finfo(torch.float32).min  # the second sequence has two padding tokens
    as_tuple = False
    with torch.no_grad(), use_mode("reference"):  # no kernel races for the probe's shapes
        for mask in (None, pad):
            ref = fused.original(x, mask)
            as_tuple = isinstance(ref, tuple)
            ref_t = ref[0] if as_tuple else ref
            got = fused.lean(x, mask)
            if got is None or not isinstance(ref_t, torch.Tensor) or ref_t.shape != got.shape:
                return False, as_tuple
            if not torch.allclose(got, ref_t, atol=PROBE_ATOL, rtol=PROBE_ATOL):
                return False, as_tuple
    return True, as_tuple


def fuse_encoder_blocks(model: nn.Module) -> int:
    """Give every plain BERT-style encoder block in ``model`` the lean forward (see the module docstring); returns
    how many blocks were fused. Blocks already fused, and blocks whose probe disagrees, are left as they are."""
    fused = 0
    for name, block in model.named_modules():
        if isinstance(block.__dict__.get("forward"), FusedEncoderForward):
            fused += 1
            continue
        parts = encoder_parts(block)
        if parts is None:
            continue
        fwd = FusedEncoderForward(block, parts, returns_tuple=False)
        try:
            ok, as_tuple = _probe_ok(block, fwd, parts.heads * parts.head_dim)
        except Exception as e:  # a block that only looks like one: keep its own forward
            log.debug("not fusing %s: probe failed (%s)", name, e)
            continue
        if not ok:
            log.debug("not fusing %s: the lean forward's probe output differs", name)
            continue
        fwd.returns_tuple = as_tuple
        block.forward = fwd  # type: ignore[method-assign]
        fused += 1
    return fused


def unfuse_encoder_blocks(model: nn.Module) -> int:
    """Undo `fuse_encoder_blocks`: every block gets its class forward back; returns how many were changed."""
    undone = 0
    for block in model.modules():
        if isinstance(block.__dict__.get("forward"), FusedEncoderForward):
            del block.forward
            undone += 1
    return undone
