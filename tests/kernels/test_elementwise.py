"""Native GELU, residual add + LayerNorm and BERT embeddings: against float64 references and PyTorch, tails, threads,
fallbacks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbit.kernels import native
from lowbit.kernels.elementwise import add_layer_norm, embed_layer_norm, gelu

needs_native = pytest.mark.skipif(not native.available(), reason="native kernels unavailable")


@needs_native
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_matches_float64_to_float_rounding(approximate):
    x = torch.cat([torch.linspace(-12, 12, 100_001), torch.randn(50_000) * 3, torch.tensor([0.0, -0.0, 1e-30])])
    ref = F.gelu(x.double(), approximate=approximate)
    got = gelu(x.clone(), approximate)
    err = ((got.double() - ref).abs() / x.double().abs().clamp_min(1.0)).max().item()
    assert err < 4e-7  # PyTorch's own float GELU is ~3e-7 from float64 by the same measure
    assert got.dtype is torch.float32 and got.shape == x.shape


@needs_native
def test_gelu_works_in_place_and_keeps_nan():
    x = torch.tensor([float("nan"), -1.0, 2.0] * 8)
    out = gelu(x)
    assert out.data_ptr() == x.data_ptr()  # the native pass writes into its input
    assert torch.isnan(out[0]) and torch.allclose(out[1:3], F.gelu(torch.tensor([-1.0, 2.0])), atol=1e-6)


@needs_native
def test_gelu_many_threads_equal_one_thread():
    x = torch.randn(300, 1000)  # above the parallel threshold
    one = gelu(x.clone(), threads=1)
    torch.testing.assert_close(gelu(x.clone(), threads=2), one, rtol=0, atol=0)


def test_gelu_falls_back_to_pytorch_for_autograd_and_strided_inputs():
    x = torch.randn(4, 6, requires_grad=True)
    y = gelu(x)
    y.sum().backward()
    assert x.grad is not None and y.data_ptr() != x.data_ptr()
    s = torch.randn(6, 4).t()  # not contiguous: a fresh tensor from PyTorch
    torch.testing.assert_close(gelu(s), F.gelu(s))
    with pytest.raises(ValueError, match="approximate must be one of"):
        gelu(torch.randn(3), "erf")


@needs_native
@pytest.mark.parametrize("d", [384, 50, 7])
@pytest.mark.parametrize("affine", [True, False])
def test_add_layer_norm_equals_layer_norm_of_the_sum(d, affine):
    torch.manual_seed(d)
    norm = nn.LayerNorm(d, eps=1e-12 if affine else 1e-5, elementwise_affine=affine)
    if affine:
        with torch.no_grad():
            norm.weight.normal_()
            norm.bias.normal_()
    x, r = torch.randn(3, 11, d) * 4 + 2, torch.randn(3, 11, d)
    with torch.no_grad():
        torch.testing.assert_close(add_layer_norm(x, r, norm), norm(x + r), atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(add_layer_norm(x, None, norm), norm(x), atol=2e-5, rtol=1e-5)


@needs_native
def test_add_layer_norm_threads_and_large_offsets():
    norm = nn.LayerNorm(256)
    x = torch.randn(400, 256) + 1000.0  # the two-pass variance keeps a large mean from cancelling the spread
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.no_grad():
            torch.testing.assert_close(add_layer_norm(x, x, norm), norm(x + x), atol=1e-3, rtol=1e-4)
    finally:
        torch.set_num_threads(old)


def test_add_layer_norm_falls_back_where_the_pass_does_not_apply():
    norm = nn.LayerNorm(8)
    x = torch.randn(2, 8, requires_grad=True)
    out = add_layer_norm(x, x, norm)
    out.sum().backward()  # PyTorch's path: gradients flow
    assert x.grad is not None
    n2 = nn.LayerNorm([2, 8])  # normalises two dimensions: PyTorch's path
    z = torch.randn(3, 2, 8)
    with torch.no_grad():
        torch.testing.assert_close(add_layer_norm(z, z, n2), n2(z + z))


def _tables(d: int = 40, vocab: int = 30, types: int = 2, positions: int = 16) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(3)
    return tuple(torch.randn(n, d, generator=g) for n in (vocab, types, positions))


@needs_native
@pytest.mark.parametrize("with_type_ids", [True, False])
def test_embed_layer_norm_equals_berts_embedding_layer(with_type_ids):
    word, types, pos = _tables()
    ln = nn.LayerNorm(40)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.uniform_(-1, 1)
    ids = torch.randint(0, 30, (3, 9))
    tids = torch.randint(0, 2, (3, 9)) if with_type_ids else None
    pids = torch.arange(16).flip(0)  # any position ids: the first L are used
    ref = ln((word[ids] + types[torch.zeros_like(ids) if tids is None else tids]) + pos[pids[:9]])
    with torch.no_grad():  # (the LayerNorm's parameters want gradients)
        got = embed_layer_norm(ids, word, types, tids, pos, pids, ln)
        no_types = embed_layer_norm(ids, word, None, None, pos, pids, ln)  # a model without a type table
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(no_types, ln(word[ids] + pos[pids[:9]]), rtol=1e-5, atol=1e-5)


@needs_native
def test_embed_layer_norm_refuses_what_it_cannot_compute():
    """None (the caller's own path runs and raises) for indices outside a table, other dtypes, autograd, too few
    position ids; nothing is read out of bounds."""
    word, types, pos = _tables()
    ln = nn.LayerNorm(40)
    ids, pids = torch.randint(0, 30, (2, 5)), torch.arange(16)
    with torch.no_grad():
        assert embed_layer_norm(ids, word, types, None, pos, pids, ln) is not None
        assert embed_layer_norm(ids + 30, word, types, None, pos, pids, ln) is None  # token id past the vocabulary
        assert embed_layer_norm(ids - 31, word, types, None, pos, pids, ln) is None
        assert embed_layer_norm(ids, word, types, torch.full((2, 5), 2), pos, pids, ln) is None  # type id 2 of 2
        assert embed_layer_norm(ids, word, types, None, pos, pids + 16, ln) is None  # position past the table
        assert embed_layer_norm(ids, word, types, None, pos, pids[:4], ln) is None  # 4 position ids for 5 tokens
        assert embed_layer_norm(ids.int(), word, types, None, pos, pids, ln) is None
        assert embed_layer_norm(ids, word.double(), types, None, pos, pids, ln) is None
    assert embed_layer_norm(ids, word.requires_grad_(), types, None, pos, pids, ln) is None  # autograd: PyTorch's
