"""Quantization-aware training: prepare a model with QAT layers, train it with distillation, export it."""
