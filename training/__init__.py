"""Concord training: architectures, data, losses, trainer, evaluation and ONNX export (needs torch)."""
