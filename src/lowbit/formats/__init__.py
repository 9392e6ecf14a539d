"""Number formats: what a tensor is stored as (integers, low-bit floats, ternary, binary) and its scales.

Example:
    >>> import torch
    >>> from lowbit.formats import FORMATS, quantize, dequantize
    >>> w = torch.randn(4, 64)
    >>> err = (dequantize(quantize(w, FORMATS["int8"])) - w).abs().max()
    >>> bool(err < 0.05)
    True
"""

from lowbit.formats.qtensor import (
    QTensor,
    code_dtype,
    decode,
    dequantize,
    encode,
    expand_params,
    fake_quantize,
    fit_params,
    quantize,
)
from lowbit.formats.registry import ACT_FORMATS, FORMATS, get_format
from lowbit.formats.spec import FP_LAYOUTS, QuantSpec

__all__ = [
    "ACT_FORMATS",
    "FORMATS",
    "FP_LAYOUTS",
    "QTensor",
    "QuantSpec",
    "code_dtype",
    "decode",
    "dequantize",
    "encode",
    "expand_params",
    "fake_quantize",
    "fit_params",
    "get_format",
    "quantize",
]
