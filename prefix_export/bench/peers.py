"""The runtimes a user would pick instead of ours, run on the same export folder in bench (`--peers`).

  genai     onnxruntime-genai's own loop on the folder (its genai_config.json; folded decoder-only
            exports): `append_tokens` for the prompt, then per step `generate_next_token` (genai's own
            greedy pick) and `get_logits` (one model run on it), whose logits the shared decode loop
            also reads; the tokens are compared with ours.
  openvino  OpenVINO's Python API on the folder's model.onnx (runtime/openvino.py), both layouts,
            float32 inference precision, driven by the same DecoderStepper as our runner.

Each is timed by bench.backends.time_generation like the other backends, and its tokens are compared
with ours (`eager_matches_export`-style) in the report.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np


class GenaiBackend:
    """onnxruntime-genai on an export folder."""

    def __init__(self, folder: Path, threads: int):
        import onnxruntime_genai as og

        start = time.perf_counter()
        # genai's CPU provider and its own thread settings (genai_config.json's session_options)
        self.model = og.Model(str(folder))
        self.session_s = time.perf_counter() - start
        self.og = og

    def stepper(self, input_ids: np.ndarray, max_new_tokens: int):
        return _GenaiStepper(self.og, self.model, input_ids, max_new_tokens)

    def close(self) -> None:
        self.model = None


class _GenaiStepper:
    def __init__(self, og, model, input_ids: np.ndarray, max_new_tokens: int):
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=input_ids.shape[1] + max_new_tokens + 1,
                                  batch_size=input_ids.shape[0])
        self.generator = og.Generator(model, params)
        self.first_tokens = input_ids
        self.started = False

    def step(self, tokens: np.ndarray) -> np.ndarray:
        # genai's own loop: `append_tokens` once (the prompt; it runs the model), then per step
        # `generate_next_token` (genai's greedy pick from the logits it has: the token the shared loop
        # picked from the same logits) and `get_logits`, which runs the model on that token.
        if not self.started:
            self.generator.append_tokens(tokens.astype(np.int32))
            self.started = True
        else:
            self.generator.generate_next_token()
        return np.asarray(self.generator.get_logits()).reshape(tokens.shape[0], 1, -1)  # (B, 1, V)


class OpenVinoBackend:
    """OpenVINO's Python API on the graph, driven by the shared loop (host cache)."""

    def __init__(self, graph: Path, threads: int, prefix: np.ndarray | None = None):
        from ..runtime.decoder import OnnxDecoder
        from ..runtime.openvino import OpenVinoSession

        start = time.perf_counter()
        self.decoder = OnnxDecoder(OpenVinoSession(graph, threads=threads), prefix)
        self.session_s = time.perf_counter() - start

    def stepper(self, input_ids: np.ndarray, max_new_tokens: int):
        from ..runtime.loop import DecoderStepper

        return DecoderStepper(self.decoder, input_ids, None, max_new_tokens)

    def close(self) -> None:
        self.decoder = None
