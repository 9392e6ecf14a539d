"""Embedded workloads (digits CNN/ViT, MiniLM) and loaders for user models."""

from lowbit.zoo.base import Workload, get_workload, list_workloads, register_workload, run_model
from lowbit.zoo.user import load_user_workload

__all__ = ["Workload", "get_workload", "list_workloads", "load_user_workload", "register_workload", "run_model"]
