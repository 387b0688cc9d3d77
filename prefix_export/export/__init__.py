"""Graph export: the torch wrappers, one object per export kind, the exporter call, ONNX post-processing,
the atomic output folder."""
