"""lowbit: make trained PyTorch models small and fast on CPUs, and prove it with measurements.

Example:
    >>> import torch
    >>> from torch import nn
    >>> import lowbit
    >>> model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    >>> small = lowbit.compress(model, "w4g128")
    >>> small(torch.randn(2, 16)).shape
    torch.Size([2, 4])
"""

from lowbit.compress import compress
from lowbit.errors import CheckpointError, DataError, LowbitError, ModelError, RecipeError
from lowbit.formats import FORMATS, QuantSpec
from lowbit.io import load, save
from lowbit.pack import pack
from lowbit.recipe import PRESETS, Recipe, Stage, get_preset, load_recipe

__version__ = "0.1.0"

__all__ = [
    "FORMATS",
    "PRESETS",
    "CheckpointError",
    "DataError",
    "LowbitError",
    "ModelError",
    "QuantSpec",
    "Recipe",
    "RecipeError",
    "Stage",
    "compress",
    "get_preset",
    "load",
    "load_recipe",
    "pack",
    "save",
]
