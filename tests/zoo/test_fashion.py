"""Fashion-MNIST reader and the 49-token ViT."""

from __future__ import annotations

import gzip
import struct

import pytest
import torch

from lowbit.errors import DataError
from lowbit.zoo.fashion import FashionCNN, fashion_vit, read_idx


def test_read_idx_roundtrip_and_truncation(tmp_path) -> None:
    raw = struct.pack(">BBBBIII", 0, 0, 8, 3, 2, 2, 3) + bytes(range(12))
    p = tmp_path / "x.gz"
    p.write_bytes(gzip.compress(raw))
    assert read_idx(p).tolist() == [[[0, 1, 2], [3, 4, 5]], [[6, 7, 8], [9, 10, 11]]]
    p.write_bytes(gzip.compress(raw[:-3]))
    with pytest.raises(DataError, match="truncated"):
        read_idx(p)


def test_models_shapes_and_token_count() -> None:
    x = torch.randn(2, 1, 28, 28)
    assert FashionCNN()(x).shape == (2, 10)
    vit = fashion_vit()
    assert vit.stem(x).flatten(2).shape[-1] == 49
    assert vit(x).shape == (2, 10)
