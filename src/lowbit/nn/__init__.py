"""Modules that stand in for ``nn.Linear`` / ``nn.Conv2d``: simulated quantized layers and the activation quantizer."""

from lowbit.nn.act import ActQuantizer
from lowbit.nn.qlayers import QuantConv2d, QuantLayer, QuantLinear, is_quant_layer

__all__ = ["ActQuantizer", "QuantConv2d", "QuantLayer", "QuantLinear", "is_quant_layer"]
