"""Measurement: quality metrics, size, MACs/BitOPs and latency — always against the original model."""

from lowbit.measure.envinfo import environment
from lowbit.measure.latency import LatencyStats, compare_latency, measure_latency
from lowbit.measure.ops import OpsReport, count_ops
from lowbit.measure.size import SizeReport, model_size

__all__ = [
    "LatencyStats",
    "OpsReport",
    "SizeReport",
    "compare_latency",
    "count_ops",
    "environment",
    "measure_latency",
    "model_size",
]
