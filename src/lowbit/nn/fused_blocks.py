"""Transformer encoder blocks run as one lean forward: fewer Python and operator calls per block.

A Hugging Face encoder block of a known layout (`lowbit.nn.block_layouts.LAYOUTS`: BERT-style — BERT, RoBERTa, MiniLM,
... — and DistilBERT, which normalise after each residual, and transformers 5's ViT, which normalises before) calls
about 15 modules, 3 dropouts, helpers (a chunking helper that inspects a signature, an attention-function lookup) and
some 50 tensor operations per forward. At batch 1 on a CPU those calls cost as much as the block's int8 matrix products.
`fuse_encoder_blocks` gives each such block a forward that computes the same thing with its own layers (packed or not,
so dispatch still picks each layer's kernel): the query / key / value products (concatenated into one layer where that
is exact, `lowbit.nn.concat`), lowbit's attention kernel (`lowbit.kernels.attention.sdpa`) on strided views of them, the
output product, residual add + LayerNorm in one pass (`lowbit.kernels.elementwise.add_layer_norm`), and the feed-forward
with a native GELU (`lowbit.kernels.elementwise.gelu`).

Once dispatch has decided every layer of a block native for a row count (the first call at that size runs the
path above, in Python), later calls run the whole block in **one C call** (``lb_encoder_block``,
``lowbit_block.cpp``): the same kernels in the same order, so the same outputs bit for bit, without a Python step
between them. The description of the block that call takes is kept while nothing it was built from changes
(`lowbit.nn.snapshot.Snapshot`). Where dispatch decided some layer dense on its own, the block races the one call
(every layer on its kernel) against the Python path once per batch bucket. lowbit's own ViT block (layout
``lowbit-vit``, ``c_only``) is fused as the one call alone: its own forward is already as lean as a Python path would
be. An encoder that loops over fused blocks runs them all in one call (`lowbit.nn.fused_stack`), a BERT-style model
its embeddings too (`lowbit.nn.fused_model`).

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

import ctypes
import logging
from typing import Any

import torch
from torch import nn

from lowbit.kernels import native
from lowbit.kernels.abi import BlockDesc
from lowbit.kernels.attention import mask_args, sdpa
from lowbit.kernels.dispatch import bucket, layer_bias, race
from lowbit.kernels.dispatch import mode as kernel_mode
from lowbit.kernels.elementwise import add_layer_norm, gelu
from lowbit.nn.block_layouts import LAYOUTS, EncoderParts, Layout, encoder_parts, get_module
from lowbit.nn.concat import concat_linears
from lowbit.nn.snapshot import Snapshot, global_hooks

__all__ = [
    "BLOCKS",
    "LAYOUTS",
    "FusedEncoderForward",
    "Layout",
    "encoder_parts",
    "fuse_encoder_blocks",
    "fused_blocks",
    "unfuse_encoder_blocks",
]

log = logging.getLogger(__name__)

#: The choices of `lowbit.pack`'s ``blocks`` argument.
BLOCKS = ("fused", "keep")
PROBE_ATOL = 1e-4
#: Probe inputs tried in turn (their generator seeds): a fused path is taken when one agrees. Quantized activations
#: at a rounding tie take the next code on one path and not the other (a static range's code flip left one MiniLM
#: `w8a8-static` block unfused in session 17); a tie is particular to its input, a wrong wiring, mask, norm or GELU
#: variant disagrees on every input. (A relative-L2 tolerance instead would have let a tanh-for-erf GELU through on
#: MiniLM: 1.5-5e-4.)
PROBE_SEEDS = (0, 1, 2)


def probe_agrees(got: torch.Tensor, ref: torch.Tensor) -> bool:
    """Whether a fused path's probe output ``got`` matches the model's own ``ref`` (elementwise, `PROBE_ATOL`)."""
    return torch.allclose(got, ref, atol=PROBE_ATOL, rtol=PROBE_ATOL)


_ACT_CODES = {"gelu": 1, "gelu_tanh": 2, "relu": 3}  # lb_block.act
_Strides4 = ctypes.c_int64 * 4


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


def _tensor_signature(layers: tuple[nn.Module, ...]) -> tuple:
    """Where every parameter and buffer of ``layers`` lives and how often it was modified in place (PyTorch's
    version counter): a copy made from them is current while this stays the same."""
    sig: list = []
    for m in layers:
        for group in (m._parameters, m._buffers):
            for t in group.values():
                if t is not None:
                    sig += (t.data_ptr(), t._version)
    return tuple(sig)


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


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
        self.layout: Layout = parts.layout
        self.heads, self.head_dim, self.scale = parts.heads, parts.head_dim, parts.scale
        self.act, self.act_kind = parts.mods.get("act"), parts.act_kind  # (no module: the block calls a function)
        slots = parts.layout.slots()
        self._slots = {role: tuple(path.split(".")) for role, path in slots.items()}
        self._containers = tuple(tuple(c.split(".")) for c in _container_paths(tuple(slots.values())))
        self._qkv_src: tuple[nn.Module, ...] = ()
        self._qkv: nn.Module | None = None
        self._qkv_sig: tuple = ()
        # The last C description (`_native_block`), what it was built from, and the calls it serves ((rows, width,
        # threads, kernel mode) for which every layer runs its native kernel): one tuple, replaced as a whole, so a
        # concurrent call never pairs a description with another one's snapshot.
        self._plan: tuple[BlockDesc, Snapshot, set[tuple[int, int, int, str]]] | None = None
        self._chain: dict[tuple, bool] = {}  # `_chained`'s verdicts

    def __getstate__(self) -> dict[str, Any]:
        # A copy (``copy.deepcopy`` of the model) describes its own layers again: the C description holds raw
        # pointers into these ones.
        return {**self.__dict__, "_plan": None, "_chain": {}}

    def qkv(self, q: nn.Module, k: nn.Module, v: nn.Module) -> nn.Module | None:
        """One layer for the query, key and value products (`lowbit.nn.concat`), rebuilt when one of them was
        swapped or any of their tensors changed (an in-place update, ``load_state_dict``); None where they cannot
        be concatenated exactly (then they run one by one)."""
        src = (q, k, v)
        sig = _tensor_signature(src)
        if sig != self._qkv_sig or any(a is not b for a, b in zip(src, self._qkv_src, strict=False)):
            self._qkv_src, self._qkv, self._qkv_sig = src, concat_linears(src), sig
        return self._qkv

    def parts_now(self) -> dict[str, Any]:
        """The block's current parts by role (`Layout.slots`; None: missing)."""
        return {role: get_module(self.block, path) for role, path in self._slots.items()}

    def joint_qkv(self) -> bool:
        """Whether query, key and value run as one layer (concatenated, or the block's own)."""
        m = self.parts_now()
        if self.layout.qkv:
            return m["qkv"] is not None
        return None not in (m["query"], m["key"], m["value"]) and self.qkv(m["query"], m["key"], m["value"]) is not None

    def original(self, *args: Any, **kwargs: Any) -> Any:
        return type(self.block).forward(self.block, *args, **kwargs)

    def __call__(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        x = hidden_states
        attention_mask = args[0] if args else kwargs.get("attention_mask")
        rest = (*args[1:], *(v for k, v in kwargs.items() if k != "attention_mask"))
        plain = not self.block.training and not any(_is_set(a) for a in rest)
        plain = plain and (attention_mask is None or isinstance(attention_mask, torch.Tensor))
        plain = plain and isinstance(x, torch.Tensor) and x.dim() == 3
        plain = plain and not (x.requires_grad and torch.is_grad_enabled())
        if not plain or torch.jit.is_tracing() or torch.compiler.is_compiling():
            return self.original(hidden_states, *args, **kwargs)
        if not x.is_contiguous():  # (a transposed stem's tokens): the C paths read rows
            x = x.contiguous()
        fast = self._plan is not None and x.dtype is torch.float32 and x.is_cpu
        fast = fast and not global_hooks()
        desc = self.planned(call_key(x.shape)) if fast else None
        y = None if desc is None else self.run_native(desc, x, attention_mask)
        if y is None:
            y = self.lean(x, attention_mask)
        if y is None:  # a part is missing, hooks on a module the lean path skips; or no C call for a C-only layout
            return self.original(hidden_states, *args, **kwargs)
        return (y,) if self.returns_tuple else y

    def planned(self, key: tuple[int, int, int, str]) -> BlockDesc | None:
        """The block's C description for a call of this `call_key` when an earlier call built it for such calls and
        nothing it was built from changed since (`lowbit.nn.snapshot.Snapshot`: no layer swapped or modified, no hook
        added, the same prepared kernels); else None (then the `lean` path runs and builds it again)."""
        plan = self._plan
        return plan[0] if plan is not None and key in plan[2] and plan[1].holds() else None

    def lean(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
        """The block's output for hidden states ``x`` (B, L, D) and an additive float or boolean attention mask;
        None when a part is missing or a module the lean path does not call has hooks."""
        m = self.parts_now()
        if any(v is None for v in m.values()) or global_hooks():
            return None
        act = m.get("act")
        containers = [get_module(self.block, c) for c in self._containers]
        if any(c is None or _hooked(c) for c in containers) or _hooked(m["norm1"]) or _hooked(m["norm2"]):
            return None
        if act is not None and _hooked(act):
            return None
        if self.layout.qkv:  # the block's own joint layer (C only)
            return self._native_block(m, m["qkv"], x, mask)
        q, k, v = m["query"], m["key"], m["value"]
        joint = self.qkv(q, k, v)  # query, key and value as one layer, unless hooks must see them one by one
        joint = None if joint is None or _hooked(q) or _hooked(k) or _hooked(v) else joint
        y = self._native_block(m, joint, x, mask)
        if y is not None or self.layout.c_only:
            return y
        return self._python_path(m, joint, x, mask)

    def _python_path(
        self, m: dict[str, Any], joint: nn.Module | None, x: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """The block on its own layers (each on the path dispatch chose for it) with lowbit's attention and native
        element-wise passes between them; for a C-only layout, the block's own forward."""
        if self.layout.c_only:
            return self.original(x) if mask is None else self.original(x, mask)
        act = m.get("act")
        pre = self.layout.pre_norm
        h = add_layer_norm(x, None, m["norm1"]) if pre else x  # the attention's input
        a = self._attend(m, joint, h, mask)
        if pre:
            y = m["attn_out"](a) + x
            f = self._feed_forward(m, act, add_layer_norm(y, None, m["norm2"]))
            return f + y
        y = add_layer_norm(m["attn_out"](a), x, m["norm1"])
        return add_layer_norm(self._feed_forward(m, act, y), y, m["norm2"])

    def _native_block(
        self, m: dict[str, Any], joint: nn.Module | None, x: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor | None:
        """The whole block in one C call (``lb_encoder_block``: the same kernels, no Python between them) when every
        layer would run its native kernel on these rows (dispatch decided so on an earlier call), the activation is a
        GELU or ReLU and the tensors are plain fp32; else None (the Python path). ``joint``: the query / key / value
        layer (`qkv`), None where they run one by one. The description it builds is kept for later calls
        (`planned`)."""
        described = self._describe(m, joint, x) or self._chained(m, joint, x, mask)
        if described is None:
            return None
        desc, layers = described
        plan = self._plan
        if plan is None or not plan[1].holds():
            qkv = () if self.layout.qkv else (m["query"], m["key"], m["value"])  # (the sources of a concatenation)
            containers = [self.block, *(get_module(self.block, c) for c in self._containers)]
            attrs = [*((ly, "_dispatch") for ly in {*layers, *qkv}), *((ly._dispatch, "state") for ly in layers)]
            attrs += [(m["norm1"], "eps"), (m["norm2"], "eps")]
            snap = Snapshot(
                containers=containers,
                read=[*layers, m["norm1"], m["norm2"]],
                copied=qkv if joint is not None else (),  # (into the concatenated layer, where there is one)
                hooked=[*containers[1:], *m.values(), *layers],  # (the block's own hooks run on its call)
                attrs=attrs,
            )
            plan = self._plan = (desc, snap, set())
        plan[2].add(call_key(x.shape))  # (while the snapshot holds, the kept description is this one's equal)
        return self.run_native(plan[0], x, mask)

    def _chained(
        self, m: dict[str, Any], joint: nn.Module | None, x: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[BlockDesc, tuple[nn.Module, ...]] | None:
        """`_describe` with every layer on its native kernel, where dispatch decided some of them dense for these rows
        (``auto`` mode): alone, a small layer's call costs about the same either way, but in the one C call the
        native kernels run without it. Timed once per (batch bucket, threads, layers) against the block's Python path
        (`dispatch.race`, alternating); the description where the one call won, else None."""
        if kernel_mode() != "auto":
            return None
        layers = [joint] if joint is not None else [m["query"], m["key"], m["value"]]
        layers += [m["attn_out"], m["fc1"], m["fc2"]]
        rows, d, threads, _ = call_key(x.shape)  # per batch bucket, as dispatch races layers
        key = (bucket(rows), d, threads, *(id(getattr(ly, "_dispatch", None)) for ly in layers))
        won = self._chain.get(key)
        if won is False:
            return None
        disps = [getattr(ly, "_dispatch", None) for ly in layers]
        unprepared = [d for d in disps if d and d.state is None]  # (dense-only layers keep no kernel layout)
        described = self._describe(m, joint, x, chained=True)
        if described is None or won:
            return described
        one_call, python = race(
            lambda: self.run_native(described[0], x, mask), lambda: self._python_path(m, joint, x, mask)
        )
        self._chain[key] = won = one_call < python
        if not won:
            for d in unprepared:  # back to what dispatch keeps for them
                d.state = None
        return described if won else None

    def _describe(
        self, m: dict[str, Any], joint: nn.Module | None, x: torch.Tensor, chained: bool = False
    ) -> tuple[BlockDesc, tuple[nn.Module, ...]] | None:
        """The block's ``lb_block`` for an input like ``x`` when the one C call can run it (see `_native_block`), and
        the layers it runs. ``chained``: with the native kernel of every layer dispatch has decided for these rows,
        whichever path it chose (`LayerDispatch.chained_addr`; see `_chained`)."""
        if not native.available() or self.act_kind is None or m.get("act") is not self.act:
            return None
        if x.dtype is not torch.float32 or not x.is_contiguous() or not x.is_cpu:
            return None
        b, n, d = x.shape
        rows, threads = b * n, torch.get_num_threads()
        qkv = (joint,) if joint is not None else (m["query"], m["key"], m["value"])
        layers = (*qkv, m["attn_out"], m["fc1"], m["fc2"])
        addrs = []
        for layer in layers:
            disp = getattr(layer, "_dispatch", None)
            addr = None
            if disp and not _hooked(layer):
                addr = disp.chained_addr(layer, rows, threads) if chained else disp.native_addr(layer, rows, threads)
            if addr is None:
                return None
            addrs.append(addr)
        # The C call trusts these (packed) layers' sizes (a mismatch would read past a buffer): any other shape takes
        # the Python path, whose layers raise the error.
        widths = [(ly.in_features, ly.out_features) for ly in layers]
        qkv_widths = [(d, 3 * d)] if joint is not None else [(d, d)] * 3
        fc1, fc2 = widths[-2:]
        if d != self.heads * self.head_dim or widths[:-2] != [*qkv_widths, (d, d)]:
            return None
        if fc1[0] != d or fc2 != (fc1[1], d):
            return None
        n1, n2 = m["norm1"], m["norm2"]
        for t in (n1.weight, n1.bias, n2.weight, n2.bias):
            if t is not None and (t.dtype is not torch.float32 or not t.is_contiguous() or not t.is_cpu):
                return None
        biases = [_ptr(layer_bias(layer)) for layer in layers]
        norms = [_ptr(n1.weight), _ptr(n1.bias), _ptr(n2.weight), _ptr(n2.bias)]
        k = len(qkv)
        first = [addrs[0] if joint is not None else None, *addrs[k:], biases[0] if joint is not None else None]
        first += biases[k:]
        desc = BlockDesc(*first, *norms, n1.eps, n2.eps, self.scale, self.heads, _ACT_CODES[self.act_kind])
        desc.pre_norm, desc.ffn = int(self.layout.pre_norm), fc1[1]
        if joint is None:
            desc.q, desc.k, desc.v = addrs[:3]
            desc.q_b, desc.k_b, desc.v_b = biases[:3]
        return desc, layers

    def run_native(self, desc: BlockDesc, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
        """``lb_encoder_block`` with ``desc`` on ``x`` (plain fp32, of the width ``desc`` was built for); None for a
        mask it cannot take or an error code (the Python path then runs the same kernels and raises the error)."""
        b, n, d = x.shape
        if mask is not None and (mask.dtype not in (torch.float32, torch.bool) or not mask.is_cpu):
            return None
        try:
            kind, mptr, mstrides, _held = mask_args(mask, b, self.heads, n, n)
        except RuntimeError:  # not broadcastable to the scores: the Python path says so
            return None
        out, lib, threads = torch.empty_like(x), native._need(), torch.get_num_threads()
        rc = lib.lb_encoder_block(
            ctypes.byref(desc), x.data_ptr(), b, n, d, mptr, kind, _Strides4(*mstrides), out.data_ptr(), threads
        )
        return None if rc else out

    def _attend(
        self, m: dict[str, Any], joint: nn.Module | None, h: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Multi-head attention of ``h`` (B, L, D) before the output projection, as (B, L, D)."""
        b, n, d = h.shape[0], h.shape[1], self.heads * self.head_dim
        heads = (b, n, self.heads, self.head_dim)
        if joint is not None:
            y = joint(h)  # (B, L, 3D): strided views for the attention kernel
            q, k, v = (y[..., i * d : (i + 1) * d].view(heads).transpose(1, 2) for i in range(3))
        else:
            q, k, v = (m[r](h).view(heads).transpose(1, 2) for r in ("query", "key", "value"))
        return sdpa(q, k, v, mask, scale=self.scale).reshape(b, n, d)

    def _feed_forward(self, m: dict[str, Any], act: nn.Module, h: torch.Tensor) -> torch.Tensor:
        f = m["fc1"](h)
        kind = self.act_kind if act is self.act else None
        f = gelu(f, "tanh" if kind == "gelu_tanh" else "none") if kind in ("gelu", "gelu_tanh") else act(f)
        return m["fc2"](f)


def call_key(shape: tuple[int, ...]) -> tuple[int, int, int, str]:
    """What decides whether a block's C description serves a call on hidden states of ``shape`` (B, L, D): rows,
    width, threads and the kernel mode (dispatch decides native or dense per row count and thread count)."""
    return (shape[0] * shape[1], shape[2], torch.get_num_threads(), kernel_mode())


def _probe_ok(block: nn.Module, fused: FusedEncoderForward, d: int, seed: int = 0) -> tuple[bool, bool]:
    """(outputs agree, the block's forward returns a tuple) on a seeded probe, without and with a padding mask."""
    from lowbit.kernels.dispatch import use_mode

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 7, d, generator=gen)
    pad = torch.zeros(2, 1, 1, 7)
    pad[1, ..., 5:] = torch.finfo(torch.float32).min  # the second sequence has two padding tokens
    as_tuple = False
    modes = {m: m.training for m in block.modules()}
    block.eval()  # the lean path serves inference only: compare it with the block's inference forward
    if fused.layout.c_only:
        try:
            return _probe_c_only(fused, x), False
        finally:
            for m, training in modes.items():
                m.training = training
    try:
        with torch.no_grad(), use_mode("reference"):  # no kernel races for the probe's shapes
            for mask in (None, pad):
                ref = fused.original(x, mask)
                as_tuple = isinstance(ref, tuple)
                ref_t = ref[0] if as_tuple else ref
                got = fused.lean(x, mask)
                if got is None or not isinstance(ref_t, torch.Tensor) or ref_t.shape != got.shape:
                    return False, as_tuple
                if not probe_agrees(got, ref_t):
                    return False, as_tuple
    finally:
        for m, training in modes.items():
            m.training = training
    return True, as_tuple


def _probe_c_only(fused: FusedEncoderForward, x: torch.Tensor) -> bool:
    """Whether the one C call runs and matches the block's own forward (called without a mask, as such blocks are)
    on a probe, every layer on its native kernel (the first calls prepare them)."""
    from lowbit.kernels.probe import native_probe

    if not native.available():
        return False
    with torch.no_grad(), native_probe(fused.block):
        for _ in range(2):
            ref = fused.original(x)
        got = fused.lean(x, None)
    ok = isinstance(ref, torch.Tensor) and got is not None and got.shape == ref.shape
    return ok and probe_agrees(got, ref)


def fuse_encoder_blocks(model: nn.Module) -> int:
    """Give every encoder block of a known layout in ``model`` the lean forward (see the module docstring; a model
    in training mode is probed in eval mode and runs the lean path once in eval mode); returns how many blocks are
    fused. Blocks already fused, and blocks whose probe disagrees, are left as they are."""
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
            for seed in PROBE_SEEDS:
                ok, as_tuple = _probe_ok(block, fwd, parts.heads * parts.head_dim, seed)
                if ok:
                    break
        except Exception as e:  # a block that only looks like one: keep its own forward
            log.debug("not fusing %s: probe failed (%s)", name, e)
            continue
        if not ok:
            log.debug("not fusing %s: the lean forward's probe output differs", name)
            continue
        fwd.returns_tuple = as_tuple
        block.forward = fwd  # type: ignore[method-assign]
        fused += 1
    if fused:  # (these modules build on this one)
        from lowbit.nn.fused_model import fuse_encoder_models
        from lowbit.nn.fused_stack import stack_encoders

        if stack_encoders(model):
            fuse_encoder_models(model)
    return fused


def instance_forwards(model: nn.Module, kind: type) -> list[tuple[str, Any]]:
    """The modules inside ``model`` whose instance ``forward`` is a ``kind`` (one of the fused forwards of this module,
    `lowbit.nn.fused_stack` and `lowbit.nn.fused_model`): (module name, that forward)."""
    found = ((name, m.__dict__.get("forward")) for name, m in model.named_modules())
    return [(name, f) for name, f in found if isinstance(f, kind)]


def drop_instance_forwards(model: nn.Module, kind: type) -> int:
    """Give every module inside ``model`` whose instance ``forward`` is a ``kind`` its class forward back; returns
    how many were changed."""
    undone = 0
    for m in model.modules():
        if isinstance(m.__dict__.get("forward"), kind):
            del m.forward
            undone += 1
    return undone


def fused_blocks(model: nn.Module) -> list[tuple[str, FusedEncoderForward]]:
    """The fused blocks inside ``model``: (module name, its `FusedEncoderForward`)."""
    return instance_forwards(model, FusedEncoderForward)


def unfuse_encoder_blocks(model: nn.Module) -> int:
    """Undo `fuse_encoder_blocks`: every block (and encoder run stacked) gets its class forward back; returns how many
    blocks were changed."""
    from lowbit.nn.fused_model import unfuse_encoder_models
    from lowbit.nn.fused_stack import unstack_encoders

    unfuse_encoder_models(model)
    unstack_encoders(model)
    return drop_instance_forwards(model, FusedEncoderForward)
