"""GELU, residual add + LayerNorm and BERT's embedding sum + LayerNorm on lowbit's native library: the operations a
transformer encoder runs around its linear layers, one C pass each (`lowbit_elementwise.cpp`).

Through PyTorch each is one to two operator calls of a few microseconds, and its exact GELU evaluates erf at ~0.6 ns
per element on x86: at an encoder's batch-1 sizes that is as much time as the int8 matrix products around it. Both
functions fall back to PyTorch where the native pass does not apply (no native library, autograd, a tensor that is
not contiguous fp32 on the CPU, ``torch.jit.trace`` recording), so they are drop-in replacements with the same
results within float rounding: GELU to ~2e-7 absolute per unit of |x| (erf by Abramowitz & Stegun 7.1.26), LayerNorm
summed in another order.

Example:
    >>> import torch
    >>> import torch.nn.functional as F
    >>> from lowbit.kernels.elementwise import add_layer_norm, gelu
    >>> x = torch.randn(4, 384)
    >>> bool(torch.allclose(gelu(x.clone()), F.gelu(x), atol=1e-5))
    True
    >>> ln = torch.nn.LayerNorm(384)
    >>> bool(torch.allclose(add_layer_norm(x, x, ln), ln(x + x), atol=1e-5))
    True
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.kernels import native

APPROXIMATIONS = ("none", "tanh")


def _native_ok(*ts: torch.Tensor | None) -> bool:
    if not native.available() or torch._C._get_tracing_state() is not None:  # a trace cannot see the C pass
        return False
    grad = torch.is_grad_enabled()
    for t in ts:
        if t is None:
            continue
        if t.dtype is not torch.float32 or not t.is_cpu or not t.is_contiguous() or (grad and t.requires_grad):
            return False
    return True


def gelu(x: torch.Tensor, approximate: str = "none", threads: int | None = None) -> torch.Tensor:
    """``F.gelu(x, approximate=...)``, computed **in place** into ``x`` when the native pass applies (a fresh tensor
    otherwise): pass a tensor nothing else reads, such as a linear layer's output."""
    if approximate not in APPROXIMATIONS:
        raise ValueError(f"approximate must be one of {APPROXIMATIONS}, got {approximate!r}")
    if not _native_ok(x) or torch.compiler.is_compiling():
        return F.gelu(x, approximate=approximate)
    n = x.numel()
    if n:
        native._need().lb_gelu(x.data_ptr(), n, int(approximate == "tanh"), threads or torch.get_num_threads())
    return x


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor | None, norm: nn.LayerNorm) -> torch.Tensor:
    """``norm(x + residual)`` (``norm(x)`` when ``residual`` is None) for a LayerNorm over the last dimension, as a
    new tensor; one native pass where it applies."""
    shape = norm.normalized_shape
    w, b = norm.weight, norm.bias
    ok = len(shape) == 1 and x.dim() >= 1 and x.shape[-1] == shape[0] and not torch.compiler.is_compiling()
    ok = ok and (residual is None or residual.shape == x.shape) and _native_ok(x, residual, w, b)
    if not ok:
        return norm(x if residual is None else x + residual)
    d = shape[0]
    out = torch.empty_like(x)
    rows = x.numel() // d if d else 0
    if rows:
        native._need().lb_add_layer_norm(
            x.data_ptr(),
            None if residual is None else residual.data_ptr(),
            rows,
            d,
            None if w is None else w.data_ptr(),
            None if b is None else b.data_ptr(),
            float(norm.eps),
            out.data_ptr(),
            None,
            torch.get_num_threads(),
        )
    return out


def embedding_args(
    ids: torch.Tensor,
    word: torch.Tensor,
    types: torch.Tensor | None,
    type_ids: torch.Tensor | None,
    positions: torch.Tensor,
    position_ids: torch.Tensor,
    norm: nn.LayerNorm,
) -> tuple[tuple, tuple, tuple[int, int, int]] | None:
    """The C arguments of BERT's embedding pass (``lb_embed_layer_norm``, ``lb_bert_encoder``): the tables and ids
    (9 values), the LayerNorm (weight, bias, eps) and (B, L, D); None where the pass does not apply (see
    `embed_layer_norm`)."""
    if ids.dim() != 2 or position_ids.dim() != 1 or len(norm.normalized_shape) != 1:
        return None
    b, n = ids.shape
    d = word.shape[-1] if word.dim() == 2 else -1
    tables = [t for t in (word, types, positions) if t is not None]
    if norm.normalized_shape[0] != d or any(t.dim() != 2 or t.shape[1] != d for t in tables):
        return None
    index = [t for t in (ids, type_ids, position_ids) if t is not None]
    if any(t.dtype is not torch.int64 or not t.is_cpu or not t.is_contiguous() for t in index):
        return None
    if (type_ids is not None and type_ids.shape != ids.shape) or position_ids.numel() < n:
        return None
    if not _native_ok(*tables, norm.weight, norm.bias) or torch.compiler.is_compiling():
        return None
    w, bias = norm.weight, norm.bias
    lookups = (
        word.data_ptr(),
        word.shape[0],
        ids.data_ptr(),
        None if types is None else types.data_ptr(),
        0 if types is None else types.shape[0],
        None if type_ids is None else type_ids.data_ptr(),
        positions.data_ptr(),
        positions.shape[0],
        position_ids.data_ptr(),
    )
    norm_args = (None if w is None else w.data_ptr(), None if bias is None else bias.data_ptr(), float(norm.eps))
    return lookups, norm_args, (b, n, d)


def embed_layer_norm(
    ids: torch.Tensor,
    word: torch.Tensor,
    types: torch.Tensor | None,
    type_ids: torch.Tensor | None,
    positions: torch.Tensor,
    position_ids: torch.Tensor,
    norm: nn.LayerNorm,
) -> torch.Tensor | None:
    """``norm((word[ids] + types[type_ids]) + positions[position_ids[:L]])`` for token ids ``(B, L)``: BERT's embedding
    layer (summed in its order) in one native pass, as a new ``(B, L, D)`` tensor. ``type_ids`` None: type 0 for every
    token; ``types`` None: no type table.

    None where the pass does not apply (no native library, tracing, autograd on a table, tensors that are not
    contiguous CPU int64 ids / fp32 tables, an index outside its table): the caller runs its own path, which raises
    the error for a bad index."""
    args = embedding_args(ids, word, types, type_ids, positions, position_ids, norm)
    if args is None:
        return None
    lookups, norm_args, shape = args
    out = native.empty_f32(*shape)
    rc = native._need().lb_embed_layer_norm(*lookups, *shape, *norm_args, out.data_ptr(), torch.get_num_threads())
    return None if rc else out
