"""An encoder's stack of fused blocks in one C call (``lb_encoder_stack``).

A Hugging Face encoder (``BertEncoder``, ``RobertaEncoder``, DistilBERT's ``Transformer``, ...) is a loop over its
blocks with the same attention mask. Once every block of the loop is fused (`lowbit.nn.fused_blocks`) and has its C
description for a call's shape (`FusedEncoderForward.planned`: dispatch decided each of its layers native for these
rows, and nothing changed since), the encoder's instance forward `FusedStackForward` runs all blocks in one C call:
the same kernels in the same order as the blocks' own calls, so the same output bit for bit, without the Python
between the blocks — at batch 1 a block's checks and calls cost more than its attention, and on a machine that
has just woken up, several times more.

Anything else — a block not described yet (the first call at a shape), training, autograd, tracing / compiling, a
hook on a block, an extra argument — runs the encoder's own forward, which calls the fused blocks one by one.
`stack_encoders` (called by `lowbit.nn.fused_blocks.fuse_encoder_blocks`) installs it only where a probe through the
one call matches the encoder's own forward.

Example:
    >>> from torch import nn
    >>> from lowbit.nn.fused_stack import stack_encoders
    >>> stack_encoders(nn.Sequential(nn.Linear(4, 4)))  # no fused encoder blocks inside: nothing stacked
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
from lowbit.kernels.attention import mask_args
from lowbit.nn.fused_blocks import (
    PROBE_SEEDS,
    FusedEncoderForward,
    _is_set,
    call_key,
    drop_instance_forwards,
    instance_forwards,
    probe_agrees,
)
from lowbit.nn.snapshot import Snapshot, global_hooks

__all__ = ["FusedStackForward", "stack_encoders", "stacked_encoders", "unstack_encoders"]

log = logging.getLogger(__name__)

_Strides4 = ctypes.c_int64 * 4


def _output_kind(ref: Any) -> Any:
    """How the encoder's own forward wraps its last hidden states (seen in ``ref``, its probe output): ``torch.Tensor``
    (as is), ``tuple`` (a 1-tuple) or a transformers ``ModelOutput`` class with nothing else set; None for anything
    else. (A class, not a function: a stacked model stays picklable.)"""
    if isinstance(ref, torch.Tensor):
        return torch.Tensor
    if type(ref) is tuple and len(ref) == 1 and isinstance(ref[0], torch.Tensor):
        return tuple
    to_tuple = getattr(ref, "to_tuple", None)
    last = getattr(ref, "last_hidden_state", None)
    if callable(to_tuple) and len(to_tuple()) == 1 and isinstance(last, torch.Tensor):
        return type(ref)
    return None


class FusedStackForward:
    """The instance ``forward`` `stack_encoders` gives an encoder: one C call for all its fused blocks where each
    has its description for the call (see the module docstring), else the encoder's own forward."""

    def __init__(self, encoder: nn.Module, blocks: nn.ModuleList) -> None:
        self.encoder, self.blocks = encoder, blocks
        self.fused: list[FusedEncoderForward] = [b.forward for b in blocks]
        self.heads = self.fused[0].heads
        # The loop's blocks stay these, fused, without hooks (the snapshot), and the encoder keeps this list.
        self._snap = Snapshot(containers=[encoder, blocks], hooked=blocks)
        self._forwards = [(b.__dict__, f) for b, f in zip(blocks, self.fused, strict=True)]
        self._array: tuple[list[BlockDesc], Any] = ([], None)  # descriptions, the C array of their addresses
        self.output: Any = torch.Tensor  # what the encoder returns (`_output_kind`), set from the probe

    def __getstate__(self) -> dict[str, Any]:
        # A copy's blocks describe their own layers: drop the array of these blocks' descriptions (raw pointers).
        return {**self.__dict__, "_array": ([], None)}

    def original(self, *args: Any, **kwargs: Any) -> Any:
        return type(self.encoder).forward(self.encoder, *args, **kwargs)

    def __call__(self, hidden_states: torch.Tensor, attention_mask: Any = None, *args: Any, **kwargs: Any) -> Any:
        plain = not self.encoder.training and not any(_is_set(a) for a in args)
        plain = plain and not any(_is_set(v) for v in kwargs.values())
        plain = plain and (attention_mask is None or isinstance(attention_mask, torch.Tensor))
        y = self.one_call(hidden_states, attention_mask) if plain and isinstance(hidden_states, torch.Tensor) else None
        if y is None:
            return self.original(hidden_states, attention_mask, *args, **kwargs)
        return self.wrap(y)

    def wrap(self, y: torch.Tensor) -> Any:
        """``y`` as the encoder's own forward returns its last hidden states."""
        kind = self.output
        return y if kind is torch.Tensor else (y,) if kind is tuple else kind(last_hidden_state=y)

    def ready(self, shape: tuple[int, ...]) -> list[BlockDesc] | None:
        """The blocks' C descriptions for hidden states of ``shape`` (B, L, D) when the one call can run them: no
        global hook, the same blocks, fused, without hooks, in eval mode, each described for such a call."""
        if global_hooks() or not self._snap.holds():
            return None
        if not all(d.get("forward") is f for d, f in self._forwards) or any(b.training for b in self.blocks):
            return None
        key = call_key(shape)
        descs = [f.planned(key) for f in self.fused]
        return None if any(d is None for d in descs) else descs

    def array(self, descs: list[BlockDesc]) -> Any:
        """The C array of pointers to ``descs`` (`ready`'s), kept while they are the blocks' descriptions."""
        held, array = self._array
        if len(descs) != len(held) or any(a is not c for a, c in zip(descs, held, strict=True)):
            # The array holds their addresses: keep them alive with it (one tuple, replaced as a whole).
            array = (ctypes.c_void_p * len(descs))(*(ctypes.addressof(c) for c in descs))
            self._array = (descs, array)
        return array

    def one_call(
        self, x: torch.Tensor, mask: torch.Tensor | None, descs: list[BlockDesc] | None = None
    ) -> torch.Tensor | None:
        """All blocks on hidden states ``x`` (B, L, D) with the attention ``mask`` in one ``lb_encoder_stack`` call;
        None where that cannot run (see the class docstring). ``descs``: what `ready` just returned for this shape."""
        if x.dim() != 3 or x.dtype is not torch.float32 or not x.is_cpu or not x.is_contiguous():
            return None
        if (x.requires_grad and torch.is_grad_enabled()) or torch.jit.is_tracing() or torch.compiler.is_compiling():
            return None
        descs = self.ready(x.shape) if descs is None else descs
        if descs is None:
            return None
        if mask is not None and (mask.dtype not in (torch.float32, torch.bool) or not mask.is_cpu):
            return None
        b, n, d = x.shape
        try:
            kind, mptr, mstrides, _held = mask_args(mask, b, self.heads, n, n)
        except RuntimeError:  # not broadcastable to the scores: the blocks say so
            return None
        out = torch.empty_like(x)
        lib, strides = native._need(), _Strides4(*mstrides)
        rc = lib.lb_encoder_stack(
            self.array(descs),
            len(descs),
            x.data_ptr(),
            b,
            n,
            d,
            mptr,
            kind,
            strides,
            out.data_ptr(),
            torch.get_num_threads(),
        )
        return None if rc else out


def _block_lists(model: nn.Module) -> list[tuple[str, nn.Module, nn.ModuleList]]:
    """(name, encoder, its list of blocks) for every module list of fused encoder blocks of one attention shape."""
    found = []
    for name, enc in model.named_modules():
        for child in enc.children():
            if not isinstance(child, nn.ModuleList) or len(child) == 0:
                continue
            fwds = [b.__dict__.get("forward") for b in child]
            if not all(isinstance(f, FusedEncoderForward) for f in fwds):
                continue
            if len({(f.heads, f.head_dim) for f in fwds}) == 1:
                found.append((name, enc, child))
    return found


def _probe(stack: FusedStackForward, d: int, seed: int = 0) -> Any:
    """Run the encoder's own forward and the one call on a seeded probe (without and with a padding mask) with every
    layer on its native kernel; the encoder's output kind (`_output_kind`) when the one call ran and matched every
    time, else None."""
    from lowbit.kernels.probe import native_probe

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 7, d, generator=gen)
    pad = torch.zeros(2, 1, 1, 7)
    pad[1, ..., 5:] = torch.finfo(torch.float32).min
    modes = {m: m.training for m in stack.encoder.modules()}
    stack.encoder.eval()
    kind = None
    try:
        with torch.no_grad(), native_probe(stack.encoder):
            for mask in (None, pad):
                for _ in range(2):  # the first call prepares the layers' kernels, the second describes the blocks
                    ref = stack.original(x, mask)
                kind = _output_kind(ref)
                got = stack.one_call(x, mask)
                ref_t = ref if isinstance(ref, torch.Tensor) else ref[0]
                if kind is None or got is None or got.shape != ref_t.shape:
                    return None
                if not probe_agrees(got, ref_t):
                    return None
    finally:
        for m, training in modes.items():
            m.training = training
    return kind


def stack_encoders(model: nn.Module) -> int:
    """Give every encoder in ``model`` whose blocks are all fused the one-call forward `FusedStackForward` (where the
    native library is there and a probe through it matches the encoder's own forward); returns how many encoders
    run stacked. Encoders already stacked count and are left as they are."""
    if not native.available():
        return 0
    stacked = 0
    for name, enc, blocks in _block_lists(model):
        if isinstance(enc.__dict__.get("forward"), FusedStackForward):
            stacked += 1
            continue
        stack = FusedStackForward(enc, blocks)
        f0 = stack.fused[0]
        try:
            kinds = (_probe(stack, f0.heads * f0.head_dim, seed) for seed in PROBE_SEEDS)
            kind = next((k for k in kinds if k is not None), None)
        except Exception as e:  # an encoder that is not a plain loop over its blocks: keep its own forward
            log.debug("not stacking %s: probe failed (%s)", name, e)
            continue
        if kind is None:
            log.debug("not stacking %s: the one call did not run or did not match on the probe", name)
            continue
        stack.output = kind
        enc.forward = stack  # type: ignore[method-assign]
        stacked += 1
    return stacked


def stacked_encoders(model: nn.Module) -> list[tuple[str, FusedStackForward]]:
    """The encoders inside ``model`` that run stacked: (module name, its `FusedStackForward`)."""
    return instance_forwards(model, FusedStackForward)


def unstack_encoders(model: nn.Module) -> int:
    """Undo `stack_encoders`: every encoder gets its class forward back; returns how many were changed."""
    return drop_instance_forwards(model, FusedStackForward)
