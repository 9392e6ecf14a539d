"""Export compressed models to other runtimes (ONNX)."""
