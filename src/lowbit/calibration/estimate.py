"""How long sequential calibration will take, estimated before it starts.

The engine times one forward pass of the first block over the stored calibration inputs (an extra pass, which also
finds the block's execution order), which gives this machine's effective matrix rate on this model's shapes:
``rate = Σ_layers 2·T·K·N / t_forward`` (T calibration tokens, each layer ``K`` inputs and ``N`` outputs), and times
a few element-wise tensor operations (`elementwise_rate`) and the fixed cost of one small tensor operation
(`call_overhead`: GPTQ's column loop and range searches make tens of thousands of such calls). Every block then
costs its passes (one to find its execution order, one per group of layers sharing an input, one to compute the
next block's inputs) and the method's solves, each counted as (matrix flops, element-wise operations, tensor-operation
calls) (`solve_flops` of each method: GPTQ's Hessian, factorisation, column sweep and range search, AWQ's scale and
clip grids, RTN's rounding).

Example:
    >>> from lowbit.calibration.estimate import estimate_seconds
    >>> est = estimate_seconds(blocks=6, passes=5, forward_s=0.1, solve=[(2e9, 1e6, 1e3)] * 2, forward_flops=1e9,
    ...                        elementwise_per_s=1e9, call_s=5e-6)
    >>> round(est, 2)
    5.47
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

#: Operations per weight of a round-to-nearest quantization (scale fit, divide, round, clamp, rescale) and of
#: one candidate of a range search (encode, decode, error).
ROUND_OPS = 10.0


def forward_flops(layers: Sequence[tuple[int, int]], tokens: int) -> float:
    """Multiply-adds ×2 of one pass of ``tokens`` rows through linear layers of (K, N) shapes."""
    return float(sum(2.0 * tokens * k * n for k, n in layers))


def estimate_seconds(
    *,
    blocks: int,
    passes: int,
    forward_s: float,
    solve: Sequence[tuple[float, float, float]],
    forward_flops: float,
    elementwise_per_s: float,
    call_s: float,
) -> float:
    """Seconds for ``blocks`` blocks, each making ``passes`` forward passes of ``forward_s`` and its layers' solves
    (``solve``: (matrix flops, element-wise operations, tensor-operation calls) per layer of one block): the flops at
    the rate the timed pass reached (``forward_flops / forward_s``), the element-wise operations at
    ``elementwise_per_s``, each call ``call_s``."""
    rate = max(forward_flops / max(forward_s, 1e-9), 1.0)
    per_block = sum(f / rate + e / max(elementwise_per_s, 1.0) + c * call_s for f, e, c in solve)
    return blocks * (passes * forward_s + per_block)


def _best_time(fn: object, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        best = min(best, time.perf_counter() - t0)
    return best


def elementwise_rate(n: int = 1 << 18) -> float:
    """Element-wise tensor operations per second here (a scale-round-clamp pass over ``n`` values: four each)."""
    x = torch.randn(n)
    return 4 * n / max(_best_time(lambda: torch.round(x * 1.7 + 0.3).clamp_(-8, 7)), 1e-9)


def call_overhead(calls: int = 200) -> float:
    """Seconds of one small tensor operation here (``torch.round`` of 64 values, the best of three runs)."""
    x = torch.randn(64)

    def run() -> None:
        for _ in range(calls):
            torch.round(x)

    return _best_time(run) / calls


#: Tensor-operation calls per column of GPTQ's sweep, per range-search candidate, per AWQ grid point.
SWEEP_CALLS, SEARCH_CALLS, GRID_CALLS = 15, 12, 15


def gptq_flops(k: int, n: int, tokens: int, *, mse: bool, group: int | None) -> tuple[float, float, float]:
    """GPTQ on one (N, K) layer: Hessian accumulation 2·T·K², damping + Cholesky + inverse in fp64 (≈ 3·K³, at about
    half the fp32 rate: counted twice), the column sweep with lazy block updates 2·K²·N; element-wise: the sweep's
    per-column quantization and, when ``mse``, the range search (80 candidates per weight); calls: the column loop
    and the range fit of each group (``group`` columns, None: whole rows)."""
    flops = 2.0 * tokens * k * k + 6.0 * k**3 + 2.0 * k * k * n
    groups = k // group if group else 1
    calls = SWEEP_CALLS * k + groups * SEARCH_CALLS * (80 if mse else 1)
    return flops, ROUND_OPS * k * n * (81 if mse else 1) + 4.0 * k * n, float(calls)


def awq_flops(k: int, n: int, tokens: int, *, grid: int, clip_steps: int, n_tokens: int) -> tuple[float, float, float]:
    """AWQ on one (N, K) layer: each of ``grid`` scales quantizes the weights and runs the sampled inputs (at most
    ``n_tokens``) through them; the clip search does the same for ``clip_steps`` ratios."""
    t, steps = min(tokens, n_tokens), grid + clip_steps
    return steps * 2.0 * t * k * n, steps * (ROUND_OPS * k * n + 2.0 * t * n), float(steps * GRID_CALLS)


def rtn_flops(k: int, n: int) -> tuple[float, float, float]:
    """Round-to-nearest of one (N, K) layer (SmoothQuant after its scale)."""
    return 0.0, ROUND_OPS * k * n, float(SEARCH_CALLS)
