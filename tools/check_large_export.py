"""A > 2 GB export, end to end: external data beside the graph, onnx.checker by path, ORT, validation.

    python tools/check_large_export.py [--layers 18 --hidden 1536 --heads 16] [--json out.json]

Builds a GPT-2 configuration with random float32 weights (default ~590M parameters, ~2.4 GB: over
protobuf's 2 GB limit, so the graph must use external data), a random prefix-tuning adapter
(P=8, no projection), exports it with the normal pipeline (validation included), then checks the
folder: model.onnx + model.onnx.data, onnx.checker on the path, an ONNX Runtime session, and the
folder moved elsewhere still loads. Prints time and peak memory (this process's max RSS: the
export runs in-process) as JSON. Needs ~3x the model size in free memory. Not part of CI.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def write_random_adapter(folder: Path, layers: int, hidden: int, heads: int, P: int) -> Path:
    """A PEFT prefix-tuning adapter folder without PEFT training: config + (P, L*2*hidden) table."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    config = {"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": P,
              "num_layers": layers, "token_dim": hidden, "num_attention_heads": heads,
              "prefix_projection": False, "encoder_hidden_size": hidden, "inference_mode": True,
              "base_model_name_or_path": "random-gpt2-large-check"}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    generator = torch.Generator().manual_seed(0)
    save_file({"base_model.prompt_encoder.default.embedding.weight":
               torch.randn(P, layers * 2 * hidden, generator=generator) * 0.5},
              str(folder / "adapter_model.safetensors"))
    return folder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=18)
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--positions", type=int, default=1024)
    parser.add_argument("--work", help="working folder (default: a temporary one, removed afterwards)")
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import onnx
    import torch
    from transformers import AutoConfig

    from prefix_export.api import export_prefix_model
    from prefix_export.source.base_model import build_tiny_model, wrap_model
    from prefix_export.runtime.sessions import create_session

    work_context = tempfile.TemporaryDirectory() if args.work is None else None
    work = Path(args.work or work_context.name)
    result = {"config": {"n_layer": args.layers, "n_embd": args.hidden, "n_head": args.heads,
                         "vocab_size": args.vocab, "n_positions": args.positions}, "machine_cpus": os.cpu_count()}
    try:
        started = time.perf_counter()
        config = AutoConfig.for_model("gpt2", n_layer=args.layers, n_embd=args.hidden, n_head=args.heads,
                                      vocab_size=args.vocab, n_positions=args.positions)
        model = build_tiny_model(config)  # random float32 weights
        params = sum(p.numel() for p in model.parameters())
        result["parameters"] = params
        result["weights_gb_fp32"] = round(params * 4 / 1e9, 2)
        result["build_model_s"] = round(time.perf_counter() - started, 1)
        adapter = write_random_adapter(work / "adapter", args.layers, args.hidden, args.heads, P=8)
        print(f"model: {params / 1e6:.0f}M parameters ({params * 4 / 1e9:.2f} GB fp32); exporting...", flush=True)
        t0 = time.perf_counter()
        large = params * 4 > 2 * 1024**3
        result["external_data"] = "automatic (> 2 GB)" if large else "forced (smoke run below 2 GB)"
        export = export_prefix_model(wrap_model(model, "random-gpt2-large-check"), adapter, work / "out",
                                     progress=False, command_line=sys.argv, external_data=not large)
        result["export_and_validate_s"] = round(time.perf_counter() - t0, 1)
        result["timing_s"] = export.report["timing_s"]
        result["validation_passed"] = export.validation.passed
        result["validation_summary"] = export.report["validation"]["summary"]
        result["greedy"] = [f"{g['matching']}/{g['new_tokens']}" for g in export.report["validation"]["greedy"]]
        files = {p.name: p.stat().st_size for p in export.folder.iterdir()}
        result["files_bytes"] = files
        result["graph_info"] = export.report["graph"]
        assert "model.onnx.data" in files, f"no external data file: {files}"
        assert not large or files["model.onnx.data"] > 2 * 1024**3, f"expected > 2 GB of external data: {files}"
        assert files["model.onnx"] < 100 * 1024**2, "the graph file itself should hold no weights"
        del model, export
        t0 = time.perf_counter()
        onnx.checker.check_model(str(work / "out" / "model.onnx"))  # by path: the > 2 GB route
        result["checker_s"] = round(time.perf_counter() - t0, 1)
        moved = work / "moved" / "elsewhere"
        moved.parent.mkdir()
        shutil.move(str(work / "out"), str(moved))
        t0 = time.perf_counter()
        session = create_session(moved / "model.onnx")
        result["ort_load_after_move_s"] = round(time.perf_counter() - t0, 1)
        import numpy as np

        feeds = {"input_ids": np.array([[1, 2, 3]], np.int64), "attention_mask": np.ones((1, 3), np.int64),
                 "position_ids": np.arange(3, dtype=np.int64)[None]}
        head_dim = args.hidden // args.heads
        for i in session.get_inputs():
            if i.name.startswith("past_key_values."):
                feeds[i.name] = np.zeros((1, args.heads, 0, head_dim), np.float32)
        logits = session.run(["logits"], feeds)[0]
        result["ort_after_move_logits_finite"] = bool(np.isfinite(logits).all())
        result["total_s"] = round(time.perf_counter() - started, 1)
        result["peak_rss_gb"] = round(peak_rss_gb(), 2)
        del session
    finally:
        if work_context is not None:
            work_context.cleanup()
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return 0 if result.get("validation_passed") else 1


if __name__ == "__main__":
    sys.exit(main())
