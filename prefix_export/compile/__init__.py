"""Graph passes on an exported graph: transformer fusions and int8 quantization."""
