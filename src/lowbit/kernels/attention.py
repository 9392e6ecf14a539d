"""fp32 scaled dot-product attention on lowbit's native library (`lb_attention`), for the short sequences of
encoders on a CPU, where PyTorch's CPU kernels carry most of their cost in per-call and per-block overhead.

`sdpa` has the meaning of ``torch.nn.functional.scaled_dot_product_attention`` for (B, H, L, D) inputs in eval (no
dropout), with an additive float or boolean mask, ``is_causal`` (top-left aligned, as PyTorch's) and grouped-query
key / value heads. It returns the (B, L, H, D) layout a transformer reshapes into its hidden states
(``out.transpose(1, 2)`` is SDPA's layout), so the caller saves that copy. It runs PyTorch's SDPA instead where the
kernel does not apply: no native library, autograd, dropout, non-fp32 or non-CPU tensors, an inner dimension that is
not contiguous, shapes the kernel does not take, or ``torch.jit.trace`` (the ONNX exporter) recording the call. One
documented difference: a query row whose every key is masked out gives zeros (PyTorch's gives NaN).

The scores of 8 query rows × 16 keys are computed as one register block over the head dimension, the softmax uses a
vectorised polynomial exp (relative error ~2e-7) and the weighted sum of values is another register block; one
(batch, head) pair per work item across the threads. Measured against PyTorch's SDPA in
`benchmarks/attention.py`.

Example:
    >>> import torch
    >>> import torch.nn.functional as F
    >>> from lowbit.kernels.attention import sdpa
    >>> q, k, v = (torch.randn(2, 4, 10, 16) for _ in range(3))
    >>> out = sdpa(q, k, v)  # (2, 10, 4, 16)
    >>> torch.allclose(out.transpose(1, 2), F.scaled_dot_product_attention(q, k, v), atol=1e-5)
    True
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F

from lowbit.kernels import native

_Strides = ctypes.c_int64 * 20  # (batch, head, row, column) strides of q, k, v, out, mask


def supported(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> bool:
    """Whether `sdpa` runs the native kernel for these arguments (otherwise it runs PyTorch's SDPA)."""
    if not native.available() or dropout_p:
        return False
    if torch._C._get_tracing_state() is not None:  # torch.jit.trace cannot see a C call writing into a tensor
        return False
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return False
    for t in (q, k, v):
        if t.dim() != 4 or t.dtype is not torch.float32 or not t.is_cpu or t.stride(-1) != 1:
            return False
    (b, h, _, d), (bk, hk, s, dk) = q.shape, k.shape
    if v.shape != k.shape or bk != b or dk != d or hk == 0 or h % hk or s == 0:
        return False
    if mask is not None:
        if mask.dtype not in (torch.float32, torch.bool) or not mask.is_cpu or not 2 <= mask.dim() <= 4:
            return False
        target = (b, h, q.shape[2], s)[4 - mask.dim() :]  # broadcastable: each size 1 or the target's
        return all(m == 1 or m == t for m, t in zip(mask.shape, target, strict=True))
    return True


def sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    *,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    threads: int | None = None,
) -> torch.Tensor:
    """``softmax(q kᵀ · scale + mask) v`` for q (B, H, L, D), k / v (B, Hkv, S, D), as (B, L, H, D) fp32 (the
    heads and rows of whatever PyTorch's SDPA returns swapped, where it runs instead).

    ``attn_mask``: float (added) or bool (True: the key takes part), broadcastable to (B, H, L, S); ``scale``
    defaults to ``D ** -0.5``; ``threads`` to ``torch.get_num_threads()``."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if not supported(q, k, v, attn_mask, dropout_p):
        gqa = {"enable_gqa": True} if k.dim() == 4 and q.dim() == 4 and k.shape[1] != q.shape[1] else {}
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **gqa
        )
        return out.transpose(-3, -2)  # (..., L, H, D)
    if torch.compiler.is_compiling():
        return torch.ops.lowbit.attention(q, k, v, attn_mask, float(scale), bool(is_causal))
    return _run(q, k, v, attn_mask, float(scale), bool(is_causal), threads)


def mask_args(
    mask: torch.Tensor | None, b: int, h: int, length: int, s: int
) -> tuple[int, int | None, tuple[int, ...], torch.Tensor | None]:
    """``lb_attention``'s mask arguments for a mask broadcastable to (b, h, length, s): (kind: 0 none, 1 float added,
    2 bool; data pointer; its four strides; the tensor to keep alive during the call)."""
    if mask is None:
        return 0, None, (0, 0, 0, 0), None
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    mask = mask.expand(b, h, length, s)
    if mask.stride(-1) != 1:
        mask = mask.contiguous()
    return (2 if mask.dtype is torch.bool else 1), mask.data_ptr(), tuple(mask.stride()), mask


def _run(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    causal: bool,
    threads: int | None = None,
) -> torch.Tensor:
    b, h, length, d = q.shape
    hk, s = k.shape[1], k.shape[2]
    out = native.empty_f32(b, length, h, d)
    kind, mptr, mstrides, _held = mask_args(mask, b, h, length, s)
    ostr = out.stride()
    strides = _Strides(*q.stride(), *k.stride(), *v.stride(), ostr[0], ostr[2], ostr[1], ostr[3], *mstrides)
    err = native._need().lb_attention(
        q.data_ptr(),
        k.data_ptr(),
        v.data_ptr(),
        out.data_ptr(),
        b,
        h,
        hk,
        length,
        s,
        d,
        strides,
        mptr,
        kind,
        scale,
        int(causal),
        torch.get_num_threads() if threads is None else threads,
    )
    if err:
        raise MemoryError("lowbit attention: out of memory for its scratch buffers")
    return out


# Inside a compiled graph the kernel is one opaque op (the same low-level registration as `lowbit::packed_linear`).
_lib = torch.library.Library("lowbit", "FRAGMENT")
_lib.define("attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale, bool causal) -> Tensor")


def _attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float, causal: bool
) -> torch.Tensor:
    return _run(q, k, v, mask, scale, causal)


_lib.impl("attention", _attention_op, "CPU")


@torch.library.register_fake("lowbit::attention", lib=_lib)
def _attention_shape(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float, causal: bool
) -> torch.Tensor:
    b, h, length, d = q.shape
    return q.new_empty((b, length, h, d))
