"""Distillation losses for compressed students (methods.md §7)."""
