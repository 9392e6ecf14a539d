"""Errors lowbit raises for bad input.

Every error carries a one-line message that names the problem and what to do about it; the CLI prints
that line and exits non-zero instead of showing a traceback.

Example:
    >>> from lowbit.errors import LowbitError
    >>> str(LowbitError("recipe 'x.yaml' not found: pass a preset name or an existing YAML path"))
    "recipe 'x.yaml' not found: pass a preset name or an existing YAML path"
"""

from __future__ import annotations


class LowbitError(Exception):
    """Base class: a user-facing problem with a one-line explanation."""


class RecipeError(LowbitError):
    """A recipe is malformed (unknown key or method, bits out of range, regex matching nothing)."""


class CheckpointError(LowbitError):
    """A saved model is missing, truncated, tampered with or of an unknown format version."""


class DataError(LowbitError):
    """Calibration or evaluation data is missing, empty or contains NaN/Inf."""


class ModelError(LowbitError):
    """A model cannot be found, loaded or compressed (unsupported layer, NaN weights, ...)."""
