"""Greedy generation with optimum's ORTModelForCausalLM on export folders (run in optimum's own venv).

optimum-onnx pins transformers < 4.58, so this script runs in a separate environment (.ci/run makes
`.ci-optimum-venv`); tests call it with that venv's python. Reads a JSON list of jobs on stdin,
    [{"folder": "...", "prompt": [5, 17, 42], "max_new_tokens": 16}, ...]
and prints one JSON list with {"folder", "new_token_ids", "seconds"} (or {"folder", "error"}) per job.
"""
from __future__ import annotations

import json
import sys
import time


def main() -> int:
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    torch.set_num_threads(1)
    jobs = json.load(sys.stdin)
    results = []
    for job in jobs:
        try:
            model = ORTModelForCausalLM.from_pretrained(job["folder"], provider="CPUExecutionProvider")
            ids = torch.tensor([job["prompt"]], dtype=torch.int64)
            started = time.perf_counter()
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=job["max_new_tokens"],
                                 do_sample=False, num_beams=1)
            results.append({"folder": job["folder"], "new_token_ids": out[0, ids.shape[1]:].tolist(),
                            "seconds": round(time.perf_counter() - started, 4)})
        except Exception as exc:  # noqa: BLE001 - reported per folder, the test shows it
            results.append({"folder": job["folder"], "error": f"{type(exc).__name__}: {exc}"})
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
