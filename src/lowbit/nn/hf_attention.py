"""Hugging Face transformers: run a model's SDPA attention on lowbit's fp32 attention kernel.

`use_lowbit_attention` registers ``"lowbit_sdpa"`` in transformers' ``AttentionInterface`` and switches every
transformers model inside a module from ``"sdpa"`` to it (with SDPA's attention masks, registered under the same
name in ``AttentionMaskInterface``). The function keeps the SDPA path's meaning: it computes
the plain case itself (`lowbit.kernels.attention.sdpa`: no dropout, no soft-capping, no position bias, no
attention weights requested, not an implicit causal mask) and hands every other call to transformers' own
``sdpa_attention_forward``. `lowbit.pack` applies it (``attention="lowbit"``, the default), and so does
`lowbit.io.load` for a packed checkpoint.

Example:
    >>> from torch import nn
    >>> from lowbit.nn.hf_attention import use_lowbit_attention
    >>> use_lowbit_attention(nn.Linear(2, 2))  # no transformers model inside: nothing switched
    0
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lowbit.kernels.attention import sdpa, supported

#: The name this function is registered under in transformers' ``AttentionInterface``.
NAME = "lowbit_sdpa"
_registered = False


def lowbit_sdpa_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature; (B, L, H, D) output as its ``sdpa_attention_forward``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    implicit_causal = query.shape[2] > 1 and attention_mask is None and causal  # transformers' own rule
    special = kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None
    if (
        implicit_causal
        or special
        or kwargs.get("output_attentions")
        or not supported(query, key, value, attention_mask, dropout)
    ):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    return sdpa(query, key, value, attention_mask, scale=scaling), None


def _register() -> bool:
    global _registered
    if _registered:
        return True
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    except ImportError:  # transformers absent or too old to have the interfaces
        return False
    AttentionInterface.register(NAME, lowbit_sdpa_forward)
    # The masks SDPA gets (an unregistered name would get none: padding would be ignored).
    AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    _registered = True
    return True


def use_lowbit_attention(model: nn.Module) -> int:
    """Switch the transformers models in ``model`` whose attention is ``"sdpa"`` to lowbit's kernel; returns how
    many were switched (0 when there are none or transformers lacks ``AttentionInterface``)."""
    switched = 0
    for m in model.modules():
        config = getattr(m, "config", None)
        if getattr(config, "_attn_implementation", None) != "sdpa" or not hasattr(m, "set_attn_implementation"):
            continue
        if not _register():
            return 0
        m.set_attn_implementation(NAME)
        switched += 1
    return switched
