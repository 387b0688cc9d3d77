"""How much time the generation loop adds around ONNX Runtime: `Engine.generate` vs a bare session.run loop.

Builds a GPT-2-small-shaped model (GPT2Config() defaults: 12 layers, 768 wide, 124M parameters,
random weights, no hub access) and a random PEFT prefix (P=20), exports it with the package, then
times greedy generation of N tokens at batch 1 on the CPU, on ONE session, in interleaved rounds:

  bare      a plain loop written here: feeds dict, session.run, presents fed back, argmax,
            mask grown by concatenation (what anyone would write against the contract);
  generate  prefix_export.runtime.loop.Engine.generate (host KV path, the CPU default);
  bound     the same with IO binding (buffers allocated once), for information.

Per-token time = wall time of a whole generation (prefill included) / N. Prints medians and the
overhead of `generate` over `bare`, and writes JSON.

    PYTHONPATH=. python tools/loop_overhead.py --work /tmp/loop --tokens 64 --rounds 15 --json loop.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402


def build_model(work: Path, num_virtual_tokens: int, seed: int = 0) -> tuple[Path, Path]:
    """GPT2Config() defaults with random weights + a random PEFT prefix-tuning adapter, saved under `work`."""
    import torch
    from peft import PrefixTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM, GPT2Config

    model_dir, adapter_dir = work / "gpt2-small-random", work / f"prefix-P{num_virtual_tokens}"
    if (model_dir / "config.json").is_file() and (adapter_dir / "adapter_config.json").is_file():
        return model_dir, adapter_dir
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(GPT2Config()).eval()
    model.save_pretrained(model_dir)
    peft_model = get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM",
                                                          num_virtual_tokens=num_virtual_tokens))
    with torch.no_grad():
        for param in peft_model.prompt_encoder["default"].parameters():
            param.normal_(0.0, 0.5)
    peft_model.save_pretrained(adapter_dir)
    return model_dir, adapter_dir


def export(work: Path, model_dir: Path, adapter_dir: Path, layout: str, validate: bool) -> Path:
    from prefix_export.api import export_prefix_model

    out = work / f"export-{layout}"
    if (out / "export_report.json").is_file():
        return out
    t0 = time.perf_counter()
    result = export_prefix_model(str(model_dir), adapter_dir, out, layout=layout, run_validation=validate,
                                 progress=False, force=True)
    print(f"exported {layout} layout in {time.perf_counter() - t0:.0f}s"
          + (f", validation {'passed' if result.validation.passed else 'FAILED'}" if validate else ""))
    return out


def bare_loop(session, prompt: np.ndarray, steps: int, kv_heads: int, head_dim: int, past_names, output_names):
    """The contract, written out: the reference every runtime would start from."""
    feeds = {name: np.zeros((1, kv_heads, 0, head_dim), np.float32) for name in past_names}
    ids = prompt[None]
    mask = np.ones((1, len(prompt)), np.int64)
    positions = np.arange(len(prompt), dtype=np.int64)[None]
    new = []
    for _ in range(steps):
        feeds["input_ids"], feeds["attention_mask"], feeds["position_ids"] = ids, mask, positions
        outputs = session.run(output_names, feeds)
        token = int(outputs[0][0, -1].argmax())
        new.append(token)
        for name, value in zip(past_names, outputs[1:]):
            feeds[name] = value
        ids = np.array([[token]], np.int64)
        positions = positions[:, -1:] + 1
        mask = np.concatenate([mask, np.ones((1, 1), np.int64)], axis=1)
    return new


class StubSession:
    """The real session's description, with a `run` that returns canned outputs at once.

    Timing both loops on it measures the Python each loop adds per token, free of the machine's
    noise (the model's own time is what makes the real numbers noisy).
    """

    def __init__(self, session, vocab: int):
        self.session = session
        self.logits = {}
        self.presents = None
        self.vocab = vocab

    def __getattr__(self, name):
        return getattr(self.session, name)

    def run(self, output_names, feeds):
        ids = feeds["input_ids"]
        logits = self.logits.get(ids.shape)
        if logits is None:
            logits = self.logits[ids.shape] = np.random.default_rng(0).standard_normal(
                (*ids.shape, self.vocab)).astype(np.float32)
        if self.presents is None:
            past = feeds[output_names[1].replace("present", "past_key_values")]
            self.presents = [np.zeros_like(past) for _ in output_names[1:]]
        return [logits, *self.presents]


def python_overhead_us(session, prompt, tokens: int, repeats: int = 20) -> dict:
    from prefix_export.runtime.decoder import OnnxDecoder
    from prefix_export.runtime.loop import Engine, GenerationConfig

    vocab = int(session.get_outputs()[0].shape[2])
    stub = StubSession(session, vocab)
    engine = Engine(OnnxDecoder(stub))
    d = engine.decoder
    config = GenerationConfig(max_new_tokens=tokens)
    runs = {"bare": lambda: bare_loop(stub, prompt, tokens, d.num_kv_heads, d.head_dim, d.past_names,
                                      d.output_names),
            "generate": lambda: engine.generate(prompt[None], None, config)}
    result = {}
    for name, fn in runs.items():
        fn()
        values = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            values.append((time.perf_counter() - t0) / tokens * 1e6)
        result[name] = round(min(values), 2)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/prefix-export-loop", help="where the model and exports go")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per generation")
    parser.add_argument("--prompt-length", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds (medians over them)")
    parser.add_argument("--threads", type=int, default=1, help="ORT intra-op threads (1: least noise)")
    parser.add_argument("--prefix-length", type=int, default=20)
    parser.add_argument("--no-validate", action="store_true", help="skip validation against PEFT at export")
    parser.add_argument("--json", help="write the results here (default: $OUT/loop_overhead.json if $OUT is set)")
    args = parser.parse_args(argv)

    import onnxruntime as ort

    from prefix_export.runtime.decoder import OnnxDecoder
    from prefix_export.runtime.loop import Engine, GenerationConfig

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model_dir, adapter_dir = build_model(work, args.prefix_length)
    folder = export(work, model_dir, adapter_dir, "folded", not args.no_validate)

    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
    engine = Engine(OnnxDecoder(session))
    bound = Engine(OnnxDecoder(session), io_binding=True)
    d = engine.decoder
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, 50257, size=args.prompt_length, dtype=np.int64)
    config = GenerationConfig(max_new_tokens=args.tokens)
    runs = {
        "bare": lambda: bare_loop(session, prompt, args.tokens, d.num_kv_heads, d.head_dim, d.past_names,
                                  d.output_names),
        "generate": lambda: engine.generate(prompt[None], None, config)[0].tolist(),
        "bound": lambda: bound.generate(prompt[None], None, config)[0].tolist(),
    }
    tokens = {name: fn() for name, fn in runs.items()}  # warm-up, and the same tokens from all three
    assert tokens["bare"] == tokens["generate"] == tokens["bound"], tokens
    times = {name: [] for name in runs}
    order = list(runs)
    for round_index in range(args.rounds):
        for name in (order if round_index % 2 == 0 else order[::-1]):  # alternate to cancel drift
            t0 = time.perf_counter()
            runs[name]()
            times[name].append((time.perf_counter() - t0) / args.tokens * 1e3)
    medians = {name: statistics.median(values) for name, values in times.items()}
    minimums = {name: min(values) for name, values in times.items()}
    overhead = medians["generate"] / medians["bare"] - 1
    # each round runs both loops back to back: their ratio shares that round's machine load
    paired = statistics.median(g / b for g, b in zip(times["generate"], times["bare"])) - 1
    stub = python_overhead_us(session, prompt, args.tokens)
    result = {
        "model": "GPT2Config() defaults, random weights (124M)", "prefix_length": args.prefix_length,
        "layout": "folded", "batch": 1, "prompt_length": args.prompt_length, "new_tokens": args.tokens,
        "rounds": args.rounds, "ort_threads": args.threads, "onnxruntime": ort.__version__,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "loadavg_1m": os.getloadavg()[0]},
        "ms_per_token_median": {k: round(v, 3) for k, v in medians.items()},
        "ms_per_token_all": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "ms_per_token_min": {k: round(v, 3) for k, v in minimums.items()},
        "generate_overhead_vs_bare": round(overhead, 4),
        "generate_overhead_vs_bare_min": round(minimums["generate"] / minimums["bare"] - 1, 4),
        "generate_overhead_vs_bare_paired_median": round(paired, 4),
        "python_us_per_token_stub_session": stub,
        "within_5_percent": abs(overhead) <= 0.05,
    }
    print(f"{'loop':<10} {'ms/token (median)':>18} {'min':>8} {'max':>8}")
    for name in runs:
        print(f"{name:<10} {medians[name]:>18.2f} {min(times[name]):>8.2f} {max(times[name]):>8.2f}")
    print(f"generate vs bare: {overhead * 100:+.1f}% by medians ({'within' if result['within_5_percent'] else 'OUTSIDE'} "
          f"5%), {result['generate_overhead_vs_bare_min'] * 100:+.1f}% by minimums, {paired * 100:+.1f}% median of "
          "per-round ratios")
    print(f"Python per token with an instant session.run: bare {stub['bare']:.1f} us, generate {stub['generate']:.1f} us "
          f"({(stub['generate'] - stub['bare']) / 1e3 / medians['bare'] * 100:+.3f}% of a real token)")
    path = args.json or (os.path.join(os.environ["OUT"], "loop_overhead.json") if os.environ.get("OUT") else None)
    if path:
        Path(path).write_text(json.dumps(result, indent=2))
        print(f"wrote {path}")
    return 0 if result["within_5_percent"] else 1


if __name__ == "__main__":
    sys.exit(main())
