"""Differentiable quantizers for quantization-aware training: STE family, LSQ/PACT, binarizers."""
