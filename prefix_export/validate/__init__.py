"""Validation: every export kind on ONNX Runtime against PEFT's own forward, compared in two phases."""
