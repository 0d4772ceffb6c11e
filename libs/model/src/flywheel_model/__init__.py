"""Flywheel's model path: preparation, export, retrieval, prompts and generation on ONNX Runtime."""
