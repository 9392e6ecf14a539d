"""lowbit's fp32 attention kernel against PyTorch's scaled_dot_product_attention."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lowbit.kernels import native
from lowbit.kernels.attention import sdpa, supported

needs_native = pytest.mark.skipif(not native.available(), reason="native kernels unavailable")

#: float rounding of a different summation order and the polynomial exp (|out| ~ 1)
ATOL = 2e-5


def _qkv(b, h, hk, length, s, d, seed=0, fused=False):
    g = torch.Generator().manual_seed(seed)
    if fused:  # q, k, v as strided views of one (B, L, 3, H, D) projection, as a transformer's are
        assert hk == h and s == length
        x = torch.randn(b, length, 3, h, d, generator=g)
        return tuple(t.transpose(1, 2) for t in x.unbind(2))
    q = torch.randn(b, h, length, d, generator=g)
    k = torch.randn(b, hk, s, d, generator=g)
    v = torch.randn(b, hk, s, d, generator=g)
    return q, k, v


def _ref(q, k, v, mask=None, causal=False, scale=None):
    gqa = {"enable_gqa": True} if k.shape[1] != q.shape[1] else {}
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale, **gqa)


SHAPES = [  # (B, H, Hkv, L, S, D): D 16 / 32 / 64 run specialised code, the others the generic one
    (1, 12, 12, 45, 45, 32),
    (2, 4, 4, 16, 16, 16),
    (3, 2, 2, 7, 19, 24),
    (2, 4, 4, 33, 70, 64),
    (1, 2, 2, 5, 5, 128),
    (2, 8, 2, 9, 9, 32),  # grouped-query attention
    (1, 3, 3, 1, 1, 16),
    (1, 2, 2, 130, 130, 16),
]


@needs_native
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mask_kind", ["none", "bool", "float", "causal"])
def test_matches_pytorch_sdpa(shape, mask_kind):
    b, h, hk, length, s, d = shape
    q, k, v = _qkv(*shape, seed=sum(shape))
    g = torch.Generator().manual_seed(1)
    mask, causal = None, False
    if mask_kind == "bool":  # padding mask, every row keeps at least its first key
        mask = torch.rand(b, 1, 1, s, generator=g) > 0.3
        mask[..., 0] = True
    elif mask_kind == "float":
        mask = torch.randn(b, 1, length, s, generator=g)
    elif mask_kind == "causal":
        causal = True
    assert supported(q, k, v, mask)
    out = sdpa(q, k, v, mask, is_causal=causal)
    assert out.shape == (b, length, h, d) and out.is_contiguous()
    torch.testing.assert_close(out.transpose(1, 2), _ref(q, k, v, mask, causal), atol=ATOL, rtol=1e-5)


@needs_native
@pytest.mark.parametrize("mask_shape", [(45, 45), (1, 45), (1, 12, 45, 45), (2, 1, 45, 45)])
def test_strided_inputs_and_broadcast_masks(mask_shape):
    q, k, v = _qkv(2, 12, 12, 45, 45, 32, fused=True)
    assert q.stride(-1) == 1 and not q.is_contiguous()
    mask = torch.randn(*mask_shape, generator=torch.Generator().manual_seed(3))
    out = sdpa(q, k, v, mask, scale=0.3)
    torch.testing.assert_close(out.transpose(1, 2), _ref(q, k, v, mask, scale=0.3), atol=ATOL, rtol=1e-5)


@needs_native
def test_masked_keys_get_exactly_zero_weight():
    """A key masked out (bool False or a float -inf) contributes nothing, however large its value."""
    q, k, v = _qkv(1, 2, 2, 4, 6, 16)
    v[:, :, 5] = 1e30
    keep = torch.ones(1, 1, 1, 6, dtype=torch.bool)
    keep[..., 5] = False
    ninf = torch.zeros(1, 1, 1, 6).masked_fill(~keep, float("-inf"))
    ref = sdpa(q[:, :, :, :], k[:, :, :5], v[:, :, :5])
    assert torch.equal(sdpa(q, k, v, keep), ref)
    assert torch.equal(sdpa(q, k, v, ninf), ref)


@needs_native
def test_a_mask_that_masks_nothing_takes_the_unmasked_path():
    """An all-true boolean or all-zero float mask (a padding mask of a batch without padding) gives the unmasked bits;
    one masked key anywhere (the last batch row, the last key) is seen."""
    q, k, v = _qkv(2, 3, 3, 5, 7, 16)
    plain = sdpa(q, k, v)
    keep = torch.ones(2, 1, 1, 7, dtype=torch.bool)
    zeros = torch.zeros(2, 3, 5, 7)
    assert torch.equal(sdpa(q, k, v, keep), plain) and torch.equal(sdpa(q, k, v, zeros), plain)
    keep[1, ..., 6] = False
    zeros[1, 2, 4, 6] = float("-inf")
    assert torch.equal(sdpa(q, k, v, keep)[0], plain[0]) and not torch.equal(sdpa(q, k, v, keep)[1], plain[1])
    assert not torch.equal(sdpa(q, k, v, zeros)[1, 4, 2], plain[1, 4, 2])  # (out: B, L, H, D)


@needs_native
def test_a_row_with_every_key_masked_gives_zeros():
    q, k, v = _qkv(1, 2, 2, 3, 4, 16)
    mask = torch.ones(1, 1, 3, 4, dtype=torch.bool)
    mask[0, 0, 1] = False
    out = sdpa(q, k, v, mask)
    assert torch.equal(out[0, 1], torch.zeros(2, 16))
    torch.testing.assert_close(out[0, 0], _ref(q, k, v, mask)[0, :, 0], atol=ATOL, rtol=1e-5)


@needs_native
def test_threads_give_the_same_bits():
    q, k, v = _qkv(4, 6, 6, 20, 20, 32)
    assert torch.equal(sdpa(q, k, v, threads=1), sdpa(q, k, v, threads=2))


@pytest.mark.parametrize("case", ["grad", "float64", "dropout", "3d", "int_mask"])
def test_unsupported_arguments_run_pytorch_sdpa(case):
    q, k, v = _qkv(1, 2, 2, 5, 5, 16)
    mask, dropout = None, 0.0
    if case == "grad":
        q.requires_grad_(True)
    elif case == "float64":
        q, k, v = q.double(), k.double(), v.double()
    elif case == "dropout":
        dropout = 0.5
    elif case == "3d":
        q, k, v = q[0], k[0], v[0]
    elif case == "int_mask":
        mask = torch.ones(5, 5, dtype=torch.int64)
    assert not supported(q, k, v, mask, dropout)
    if case == "dropout":
        assert sdpa(q, k, v, dropout_p=dropout).shape == (1, 5, 2, 16)
        return
    if case == "int_mask":
        with pytest.raises(RuntimeError):  # PyTorch's own error for a mask it does not take
            sdpa(q, k, v, mask)
        return
    out = sdpa(q, k, v, mask)
    torch.testing.assert_close(out.transpose(-3, -2), F.scaled_dot_product_attention(q, k, v))
    if case == "grad":
        out.sum().backward()
        assert q.grad is not None


@needs_native
@pytest.mark.slow
def test_compiled_graph_calls_the_kernel():
    q, k, v = _qkv(2, 4, 4, 10, 10, 16)

    def f(q, k, v):
        return sdpa(q, k, v).reshape(2, 10, 64) * 2

    compiled = torch.compile(f)
    torch.testing.assert_close(compiled(q, k, v), f(q, k, v))


def test_a_mask_that_does_not_broadcast_is_left_to_pytorch():
    q, k, v = _qkv(2, 2, 2, 5, 5, 16)
    assert not supported(q, k, v, torch.zeros(3, 1, 5, 5))
    assert not supported(q, k, v, torch.zeros(5, 4))
    assert supported(q, k, v, torch.zeros(2, 1, 1, 5)) == native.available()
