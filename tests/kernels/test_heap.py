"""Freed heap pages returned after a large race (`lowbit.kernels.heap`)."""

from __future__ import annotations

import platform

import pytest
import torch

from lowbit.kernels import dispatch, heap, native
from tests.kernels.test_dispatch import packed_layer


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc_trim")
def test_release_free_heap_calls_malloc_trim_on_glibc() -> None:
    assert heap.release_free_heap() is True and heap._trim not in (None, False)


@pytest.mark.skipif(not native.available(), reason="no native kernels: nothing is raced")
@pytest.mark.usefixtures("auto_mode")
@pytest.mark.parametrize(("k", "n", "rows", "trims"), [(1024, 1024, 4, 1), (384, 96, 4, 0), (384, 96, 12000, 1)])
def test_a_race_with_large_temporaries_returns_the_freed_heap_once(monkeypatch, k, n, rows, trims) -> None:
    """A layer's first call in auto mode races its paths, then drops the weights the loser needed; where its fp32
    weight and output reach `TRIM_BYTES` the freed heap goes back to the OS once, after that race: not on the calls
    dispatch has decided, and not after a small layer's race (~1 ms a trim against a few ms of racing)."""
    calls: list[int] = []
    monkeypatch.setattr(dispatch, "release_free_heap", lambda: calls.append(1) or True)
    _, p = packed_layer("int8", "int8_token", k=k, n=n)
    x = torch.randn(rows, k)
    with torch.no_grad():
        p(x)
        assert len(calls) == trims
        p(x), p(x)
    assert len(calls) == trims and p[0]._dispatch.decided
