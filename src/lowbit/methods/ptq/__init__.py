"""Pure tensor math of the post-training quantization methods (no hooks, no module surgery)."""
