"""Transformer encoder blocks run as one lean forward: fewer Python and operator calls per block.

A Hugging Face post-LayerNorm encoder block (the `LAYOUTS`: BERT-style — BERT, RoBERTa, MiniLM, ... —
``attention.self.{query,key,value}``, ``attention.output.{dense,LayerNorm}``, ``intermediate.{dense,
intermediate_act_fn}``, ``output.{dense,LayerNorm}``; and DistilBERT's ``attention.{q,k,v,out}_lin``, ``sa_layer_norm``,
``ffn.{lin1,activation,lin2}``, ``output_layer_norm``) calls about 15 modules, 3 dropouts, a chunking helper that
inspects a signature, an attention-function lookup and some 50 tensor operations per forward. At batch 1 on a CPU those
calls cost as much as the block's int8 matrix products. `fuse_encoder_blocks` gives each such block a forward that
computes the same thing with its own layers (packed or not, so dispatch still picks each layer's kernel): the query /
key / value products, lowbit's attention kernel (`lowbit.kernels.attention.sdpa`) on strided views (the query / key /
value layers concatenated into one where that is exact, `lowbit.nn.concat`), the output product, one pass for residual
add + LayerNorm (`lowbit.kernels.elementwise.add_layer_norm`), the feed-forward with a native GELU
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


@dataclass(frozen=True)
class Layout:
    """Where a post-LayerNorm encoder block family keeps its parts: dotted paths from the block."""

    name: str
    query: str
    key: str
    value: str
    attn_out: str
    norm1: str
    fc1: str
    act: str
    fc2: str
    norm2: str
    attention: str  # the module holding the head count (and the head size, where it has one)
    heads_attr: str
    head_dim_attr: str | None  # None: hidden size // heads
    chunking: str  # the module whose ``chunk_size_feed_forward`` must be 0

    def slots(self) -> dict[str, str]:
        """The nine parts by role, in the order `FusedEncoderForward` resolves them."""
        roles = ("query", "key", "value", "attn_out", "norm1", "fc1", "act", "fc2", "norm2")
        return {r: getattr(self, r) for r in roles}


#: The block families `fuse_encoder_blocks` recognises (transformers' BERT / RoBERTa / MiniLM / ... and DistilBERT).
LAYOUTS = (
    Layout(
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
        chunking="",
    ),
    Layout(
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
        head_dim_attr=None,
        chunking="ffn",
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


def _get(root: nn.Module, path: str) -> nn.Module | None:
    """The submodule at dotted ``path`` through ``_modules`` (None if absent): a few dict lookups per call."""
    m: Any = root
    for key in path.split(".") if path else ():
        m = m._modules.get(key) if isinstance(m, nn.Module) else None
        if m is None:
            return None
    return m


def _parts_of(block: nn.Module, layout: Layout) -> EncoderParts | None:
    mods = {role: _get(block, path) for role, path in layout.slots().items()}
    att = _get(block, layout.attention)
    if att is None or any(m is None for m in mods.values()):
        return None
    try:
        heads = int(getattr(att, layout.heads_attr))
        if layout.head_dim_attr is not None:
            head_dim = int(getattr(att, layout.head_dim_attr))
        else:
            head_dim = int(mods["query"].out_features) // heads  # type: ignore[union-attr]
    except (AttributeError, TypeError, ValueError, ZeroDivisionError):
        return None
    if getattr(block, "is_decoder", False) or getattr(block, "add_cross_attention", False):
        return None
    if getattr(_get(block, layout.chunking), "chunk_size_feed_forward", 0):
        return None
    if getattr(att, "position_embedding_type", "absolute") != "absolute" or getattr(att, "is_causal", False):
        return None
    if not all(isinstance(mods[n], nn.LayerNorm) and len(mods[n].normalized_shape) == 1 for n in ("norm1", "norm2")):
        return None
    d = heads * head_dim
    for role in ("query", "key", "value", "attn_out", "fc1"):
        if not _linear_like(mods[role], d):
            return None
    if not _linear_like(mods["fc2"]) or any(mods[r].out_features != d for r in ("query", "key", "value")):
        return None
    scale = float(getattr(att, "scaling", head_dim**-0.5))
    return EncoderParts(layout, mods, heads, head_dim, scale, _gelu_kind(mods["act"]))  # type: ignore[arg-type]


def encoder_parts(block: nn.Module) -> EncoderParts | None:
    """The parts of ``block`` if it is a plain post-LayerNorm encoder block of a known layout (self-attention only,
    absolute positions, no feed-forward chunking), else None."""
    for layout in LAYOUTS:
        parts = _parts_of(block, layout)
        if parts is not None:
            return parts
    return None


def _is_set(v: Any) -> bool:
    return v is not None and v is not False


def _container_paths(paths: tuple[str, ...]) -> tuple[str, ...]:
    """The modules on the way to ``paths`` (``attention.self.query`` → ``attention``, ``attention.self``): the
    lean path skips their forwards."""
    found: set[str] = set()
    for path in paths:
        names = path.split(".")[:-1]
        found.update(".".join(names[: i + 1]) for i in range(len(names)))
    return tuple(sorted(found))


def _hooked(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks)


class FusedEncoderForward:
    """The instance ``forward`` `fuse_encoder_blocks` gives a block: the lean path, or the block's own forward.

    The parts are looked up in the block at every call (a few dict lookups), so a layer swapped in later
    (``lowbit.compress`` / ``lowbit.pack`` on a fused model) is the one that runs; a hook on any module the lean
    path does not call (containers, norms, the activation, and query / key / value when they run as one layer)
    sends the call to the block's own forward."""

    def __init__(self, block: nn.Module, parts: EncoderParts, returns_tuple: bool) -> None:
        self.block, self.returns_tuple = block, returns_tuple
        self.layout = parts.layout
        self.heads, self.head_dim, self.scale = parts.heads, parts.head_dim, parts.scale
        self.act, self.gelu = parts.mods["act"], parts.gelu
        slots = parts.layout.slots()
        self._roles = tuple(slots)
        self._paths = tuple(slots.values())
        self._containers = _container_paths(self._paths)
        self._qkv_src: tuple[nn.Module, ...] = ()
        self._qkv: nn.Module | None = None

    def qkv(self, q: nn.Module, k: nn.Module, v: nn.Module) -> nn.Module | None:
        """One layer for the query, key and value products (`lowbit.nn.concat`), rebuilt when one of them was
        swapped; None where they cannot be concatenated exactly (then they run one by one)."""
        src = (q, k, v)
        if len(self._qkv_src) != 3 or any(a is not b for a, b in zip(src, self._qkv_src, strict=True)):
            self._qkv_src, self._qkv = src, concat_linears(src)
        return self._qkv

    def parts_now(self) -> list[Any]:
        """The block's current query, key, value, output, norm1, fc1, activation, fc2 and norm2 (None: missing)."""
        return [_get(self.block, p) for p in self._paths]

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
        if y is None:  # a part is missing, or hooks on a module the lean path skips
            return self.original(hidden_states, attention_mask, *args, **kwargs)
        return (y,) if self.returns_tuple else y

    def lean(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
        """The block's output for hidden states ``x`` (B, L, D) and an additive float or boolean attention mask;
        None when a part is missing or a module the lean path does not call has hooks."""
        found = self.parts_now()
        if any(m is None for m in found):
            return None
        query, key, value, attn_out, norm1, fc1, act, fc2, norm2 = found
        skipped = [_get(self.block, c) for c in self._containers]
        if any(m is None or _hooked(m) for m in skipped) or _hooked(norm1) or _hooked(norm2) or _hooked(act):
            return None
        b, n, d = x.shape[0], x.shape[1], self.heads * self.head_dim
        heads = (b, n, self.heads, self.head_dim)
        qkv = self.qkv(query, key, value)
        if qkv is not None and not (_hooked(query) or _hooked(key) or _hooked(value)):
            y = qkv(x)  # (B, L, 3D): strided views for the attention kernel
            q, k, v = (y[..., i * d : (i + 1) * d].view(heads).transpose(1, 2) for i in range(3))
        else:
            q, k, v = (m(x).view(heads).transpose(1, 2) for m in (query, key, value))
        a = sdpa(q, k, v, mask, scale=self.scale).reshape(b, n, d)
        h = add_layer_norm(attn_out(a), x, norm1)
        f = fc1(h)
        f = gelu(f, self.gelu) if self.gelu is not None and act is self.act else act(f)
        return add_layer_norm(fc2(f), h, norm2)


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


def fused_blocks(model: nn.Module) -> list[tuple[str, FusedEncoderForward]]:
    """The fused blocks inside ``model``: (module name, its `FusedEncoderForward`)."""
    found = ((name, m.__dict__.get("forward")) for name, m in model.named_modules())
    return [(name, f) for name, f in found if isinstance(f, FusedEncoderForward)]


def unfuse_encoder_blocks(model: nn.Module) -> int:
    """Undo `fuse_encoder_blocks`: every block gets its class forward back; returns how many were changed."""
    undone = 0
    for block in model.modules():
        if isinstance(block.__dict__.get("forward"), FusedEncoderForward):
            del block.forward
            undone += 1
    return undone
