"""A BERT-style encoder model in one C call: the embeddings, then every block (`lowbit.nn.fused_stack`).

With its encoder stacked, what is left of a packed BERT's forward at batch 1 is Python: transformers' embedding module
(three lookups, two adds, a LayerNorm), its attention-mask builder and the decorators around the model's forward —
about 0.3 ms warm and several times that on a machine that has just woken up, as much as a tenth of the whole call.
`FusedBertForward`, the instance forward `fuse_encoder_models` gives such a model, runs all of it in one C call
(``lb_bert_encoder``: the embedding sum and its LayerNorm — `lowbit.kernels.elementwise.embed_layer_norm`'s pass —, the
padding mask as the keys' flags, then the stacked blocks) and calls the pooler, if any, as transformers does.

It applies to the plain call — ``input_ids`` with an optional ``attention_mask`` and ``token_type_ids``, in eval mode
without autograd — of an encoder-only model whose embedding layer is BERT's (word + token type + absolute position,
LayerNorm) and whose encoder runs stacked; anything else (other arguments, a config asking for hidden states or
attentions, hooks, training, tracing, the first call at a new shape) runs the model's own forward. A model is fused
only where a probe (with and without padding and token types) matches its own forward.

Example:
    >>> from torch import nn
    >>> from lowbit.nn.fused_model import fuse_encoder_models
    >>> fuse_encoder_models(nn.Sequential(nn.Linear(4, 4)))  # no stacked BERT encoder inside: nothing fused
    0
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from lowbit.kernels import native
from lowbit.kernels.elementwise import embedding_args
from lowbit.nn.fused_blocks import PROBE_SEEDS, _is_set, drop_instance_forwards, instance_forwards, probe_agrees
from lowbit.nn.fused_stack import FusedStackForward
from lowbit.nn.snapshot import Snapshot, global_hooks

__all__ = ["FusedBertForward", "fuse_encoder_models", "fused_models", "unfuse_encoder_models"]

log = logging.getLogger(__name__)

_OUTPUTS = {"last_hidden_state", "pooler_output"}


def _bert_embeddings(emb: nn.Module) -> bool:
    """Whether ``emb`` has the parts of transformers' ``BertEmbeddings``."""
    tables = ("word_embeddings", "position_embeddings")
    if not all(isinstance(getattr(emb, t, None), nn.Embedding) for t in tables):
        return False
    types = getattr(emb, "token_type_embeddings", None)
    ids = getattr(emb, "position_ids", None)
    return (
        (types is None or isinstance(types, nn.Embedding))
        and isinstance(getattr(emb, "LayerNorm", None), nn.LayerNorm)
        and isinstance(ids, torch.Tensor)
        and ids.dim() == 2
    )


class FusedBertForward:
    """The instance ``forward`` `fuse_encoder_models` gives a BERT-style model (see the module docstring)."""

    def __init__(self, model: nn.Module, stack: FusedStackForward) -> None:
        self.model, self.stack = model, stack
        self.output_cls: Any = None  # the model's output class, from the probe
        self._snap: Snapshot | None = None
        self._params: list[torch.Tensor] = []

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_snap": None, "_params": []}  # a copy checks its own embeddings

    def original(self, *args: Any, **kwargs: Any) -> Any:
        return type(self.model).forward(self.model, *args, **kwargs)

    def __call__(
        self, input_ids: Any = None, attention_mask: Any = None, token_type_ids: Any = None, *args: Any, **kwargs: Any
    ) -> Any:
        y = None
        if not any(_is_set(a) for a in args) and not any(_is_set(v) for v in kwargs.values()):
            y = self.fast(input_ids, attention_mask, token_type_ids)
        return self.original(input_ids, attention_mask, token_type_ids, *args, **kwargs) if y is None else y

    def _embeddings_ok(self) -> bool:
        """Whether the embedding module is still what the fast path computes (checked again after any change)."""
        snap = self._snap
        if snap is not None and snap.holds():
            return True
        emb = self.model.embeddings
        if not _bert_embeddings(emb) or emb.word_embeddings.max_norm is not None:
            return False
        default_types = getattr(emb, "token_type_ids", None)  # transformers' default type ids: must be type 0
        if isinstance(default_types, torch.Tensor) and bool(default_types.any()):
            return False
        types = getattr(emb, "token_type_embeddings", None)
        parts = [emb.word_embeddings, emb.position_embeddings, emb.LayerNorm, *([] if types is None else [types])]
        self._params = [p for m in parts for p in m.parameters()]
        checked = [default_types] if isinstance(default_types, torch.Tensor) else []  # (to be type 0)
        self._snap = Snapshot(
            containers=[self.model, emb],
            read=parts,
            copied=checked,
            hooked=[emb, *emb.children(), self.model.encoder],  # (the encoder's call is skipped too)
            attrs=[(emb, "position_ids"), (emb, "token_type_ids")] if checked else [(emb, "position_ids")],
        )
        return self._snap.holds()

    def fast(self, ids: Any, mask: Any, type_ids: Any) -> Any:
        """The model's output through the embedding pass and the stacked encoder; None where that does not apply."""
        m = self.model
        if m.training or not isinstance(ids, torch.Tensor) or ids.dim() != 2 or self.output_cls is None:
            return None
        cfg = m.config
        if cfg.output_attentions or cfg.output_hidden_states or not cfg.return_dict or cfg.is_decoder:
            return None
        if torch.jit.is_tracing() or torch.compiler.is_compiling() or global_hooks():
            return None
        if m.encoder.__dict__.get("forward") is not self.stack or not self._embeddings_ok():
            return None
        if torch.is_grad_enabled() and any(p.requires_grad for p in self._params):
            return None
        if mask is not None and (not isinstance(mask, torch.Tensor) or mask.shape != ids.shape):
            return None
        if type_ids is not None and (not isinstance(type_ids, torch.Tensor) or type_ids.shape != ids.shape):
            return None
        emb = m.embeddings
        b, n = ids.shape
        d = emb.word_embeddings.embedding_dim
        descs = self.stack.ready((b, n, d))
        if descs is None:  # (the first call at this shape, or hooks on the blocks): the model's own forward
            return None
        if mask is not None and mask.dtype is not torch.int64:
            mask = mask.long()  # (0: padding, as transformers reads it)
        if mask is not None and (not mask.is_cpu or not mask.is_contiguous()):
            return None
        types = getattr(emb, "token_type_embeddings", None)
        args = embedding_args(
            ids,
            emb.word_embeddings.weight,
            None if types is None else types.weight,
            type_ids,
            emb.position_embeddings.weight,
            emb.position_ids[0],
            emb.LayerNorm,
        )
        if args is None:
            return None
        lookups, norm_args, shape = args
        y = native.empty_f32(*shape)
        flags = None if mask is None else mask.data_ptr()
        array, threads = self.stack.array(descs), torch.get_num_threads()
        rc = native._need().lb_bert_encoder(
            *lookups, *norm_args, flags, array, len(descs), *shape, y.data_ptr(), threads
        )
        if rc:  # an index outside its table (the model's own forward raises the error), or no memory
            return None
        pooled = m.pooler(y) if m.pooler is not None else None
        return self.output_cls(last_hidden_state=y, pooler_output=pooled)


def _candidates(model: nn.Module) -> list[tuple[str, nn.Module, FusedStackForward]]:
    found = []
    for name, m in model.named_modules():
        enc, emb, cfg = getattr(m, "encoder", None), getattr(m, "embeddings", None), getattr(m, "config", None)
        stack = enc.__dict__.get("forward") if isinstance(enc, nn.Module) else None
        if not isinstance(stack, FusedStackForward) or not isinstance(emb, nn.Module) or not _bert_embeddings(emb):
            continue
        if cfg is not None and not getattr(cfg, "is_decoder", False) and hasattr(m, "pooler"):
            found.append((name, m, stack))
    return found


def _probe_inputs(model: nn.Module, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    emb = model.embeddings
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, emb.word_embeddings.num_embeddings, (2, 7), generator=g)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    with_types = {"input_ids": ids, "attention_mask": mask}
    types = getattr(emb, "token_type_embeddings", None)
    if types is not None:
        with_types["token_type_ids"] = torch.randint(0, types.num_embeddings, (2, 7), generator=g)
    return [with_types, {"input_ids": ids}]


def _probe(fused: FusedBertForward, seed: int = 0) -> Any:
    """The model's output class when the fast path ran on every probe input (`_probe_inputs` of ``seed``) and matched
    the model's own forward."""
    from lowbit.kernels.probe import native_probe

    model = fused.model
    modes = {m: m.training for m in model.modules()}
    model.eval()
    cls = None
    try:
        with torch.no_grad(), native_probe(model):
            for batch in _probe_inputs(model, seed):
                for _ in range(3):  # prepare the kernels, describe the blocks, run the stack: as a user's calls would
                    ref = fused.original(**batch)
                cls = type(ref)
                keys = set(ref.keys()) if hasattr(ref, "keys") else {None}
                if not keys <= _OUTPUTS or "pooler_output" not in getattr(cls, "__dataclass_fields__", {}):
                    return None
                fused.output_cls = cls
                got = fused.fast(batch["input_ids"], batch.get("attention_mask"), batch.get("token_type_ids"))
                if got is None:
                    return None
                for k in keys:
                    if not probe_agrees(got[k], ref[k]):
                        return None
    finally:
        fused.output_cls = None
        for m, training in modes.items():
            m.training = training
    return cls


def fuse_encoder_models(model: nn.Module) -> int:
    """Give every BERT-style model inside ``model`` whose encoder runs stacked (`lowbit.nn.fused_stack`) the forward
    `FusedBertForward`, where a probe through it matches the model's own forward; returns how many models run it.
    Models already fused count and are left as they are."""
    fused = 0
    for name, m, stack in _candidates(model):
        if isinstance(m.__dict__.get("forward"), FusedBertForward):
            fused += 1
            continue
        fwd = FusedBertForward(m, stack)
        try:
            cls = next((c for c in (_probe(fwd, seed) for seed in PROBE_SEEDS) if c is not None), None)
        except Exception as e:  # not the model it looks like: keep its own forward
            log.debug("not fusing %s: probe failed (%s)", name, e)
            continue
        if cls is None:
            log.debug("not fusing %s: the fast path did not run or did not match on the probe", name)
            continue
        fwd.output_cls = cls
        m.forward = fwd  # type: ignore[method-assign]
        fused += 1
    return fused


def fused_models(model: nn.Module) -> list[tuple[str, FusedBertForward]]:
    """The models inside ``model`` that run `FusedBertForward`: (module name, it)."""
    return instance_forwards(model, FusedBertForward)


def unfuse_encoder_models(model: nn.Module) -> int:
    """Undo `fuse_encoder_models`: every model gets its class forward back; returns how many were changed."""
    return drop_instance_forwards(model, FusedBertForward)
