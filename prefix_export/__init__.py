"""prefix-export: a Hugging Face causal LM + a PEFT prefix-tuning checkpoint -> a validated ONNX decoder.

Pipeline (one module each): checkpoint -> prefix_kv -> export -> graph -> validate -> runtime -> bench.
"""
__version__ = "0.1.0"
