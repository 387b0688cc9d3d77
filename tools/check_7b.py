"""7B-class checkpoints on a 24 GB machine: build, export + validate with default flags, generate, clean up.

    python tools/check_7b.py                      # both shapes: llama2-7b, mistral-7b
    python tools/check_7b.py --shape llama2-7b --keep /data/work --json out.json

Each model is random-weight, float16, written shard by shard (about 2 GB at a time, with its
`model.safetensors.index.json`), so building it never holds the whole model; its prefix (P=20) is a
random PEFT adapter folder shaped by PEFT's own config rules. Then, each in a subprocess whose peak
RSS is read from the kernel (ru_maxrss of the child): `prefix-export` with no flags (export and
validation), and `prefix-export generate --token-ids`. Reported: times, peak RSS against the
machine's memory and the weight bytes, the validation's greedy token equality, generate's tokens.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {
    # Llama-2-7B: MHA (32 KV heads), 4096 positions.
    "llama2-7b": dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096,
                      rms_norm_eps=1e-5, tie_word_embeddings=False),
    # Mistral-7B v0.1: GQA (8 KV heads), sliding window 4096.
    "mistral-7b": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                       max_position_embeddings=32768, sliding_window=4096, rms_norm_eps=1e-5,
                       tie_word_embeddings=False),
    # TinyLlama-1.1B-shaped (22 layers, GQA 32/4): the 1.1B memory figure, re-measured.
    "llama-1.1b": dict(model_type="llama", hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                       num_attention_heads=32, num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048,
                       rms_norm_eps=1e-5, tie_word_embeddings=False),
    # A small shape with the same code path, to try the tool in a minute.
    "smoke": dict(model_type="mistral", hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=2, vocab_size=1000, max_position_embeddings=512,
                  sliding_window=64, tie_word_embeddings=False),
}
SHARD_BYTES = 2 * 1024**3


def build_model(shape: str, folder: Path) -> dict:
    """Random float16 weights written shard by shard; returns {parameters, weight_bytes, shards, build_s}."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    started = time.perf_counter()
    values = dict(SHAPES[shape])
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    config.dtype = torch.float16
    with torch.device("meta"):  # names and shapes only: nothing is allocated
        skeleton = AutoModelForCausalLM.from_config(config)
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    shards, current, current_bytes, index, total = [], {}, 0, {}, 0
    params = list(skeleton.state_dict().items())

    def flush():
        nonlocal current, current_bytes
        if current:
            name = f"model-{len(shards) + 1:05d}-of-NNNNN.safetensors"
            save_file(current, str(folder / name), metadata={"format": "pt"})
            shards.append((name, list(current)))
            current, current_bytes = {}, 0

    for name, meta in params:
        if name.endswith("norm.weight") or "layernorm" in name:
            tensor = torch.ones(meta.shape, dtype=torch.float16)
        else:
            tensor = (torch.randn(meta.shape, generator=generator) * 0.02).to(torch.float16)
        nbytes = tensor.numel() * 2
        if current_bytes + nbytes > SHARD_BYTES:
            flush()
        current[name] = tensor
        current_bytes += nbytes
        total += nbytes
    flush()
    count = len(shards)
    for number, (name, names) in enumerate(shards, start=1):
        final = name.replace("NNNNN", f"{count:05d}")
        (folder / name).rename(folder / final)
        index.update({n: final for n in names})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": index}, indent=2))
    config.save_pretrained(folder)
    return {"parameters": sum(m.numel() for _, m in params), "weight_bytes": total, "shards": count,
            "build_s": round(time.perf_counter() - started, 1)}


def build_prefix(model: Path, folder: Path, num_virtual_tokens: int = 20) -> None:
    """A random P-token PEFT adapter folder, its config filled in by PEFT's own rules for this model."""
    import torch
    from peft import PrefixTuningConfig
    from peft.utils.other import _prepare_prompt_learning_config
    from safetensors.torch import save_file
    from transformers import AutoConfig

    config = _prepare_prompt_learning_config(
        PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens),
        AutoConfig.from_pretrained(str(model)).to_dict())
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(folder))
    width = config.num_layers * 2 * config.token_dim
    generator = torch.Generator().manual_seed(1)
    save_file({"prompt_embeddings": torch.randn(num_virtual_tokens, width, generator=generator) * 0.5},
              str(folder / "adapter_model.safetensors"))


# A fresh wrapper process per command: its only child is the command, so its ru_maxrss of children is
# that command's peak alone (this process's own RUSAGE_CHILDREN is the max over every child so far).
WRAPPER = ("import resource, subprocess, sys; done = subprocess.run(sys.argv[1:]); "
           "sys.stderr.write(f'\\npeak_kb {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}\\n'); "
           "sys.exit(done.returncode)")


def run_measured(command: list[str]) -> dict:
    """Run `command`; its wall time, exit code, output tail and its own peak RSS."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", WRAPPER, *command], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    peak_kb = int(done.stderr.rsplit("peak_kb", 1)[1].split()[0]) if "peak_kb" in done.stderr else 0
    return {"command": " ".join(command), "exit_code": done.returncode, "wall_s": round(time.perf_counter() - started, 1),
            "peak_rss_gb": round(peak_kb / 1024**2, 2), "stdout_tail": done.stdout[-4000:],
            "stderr_tail": done.stderr[-3000:]}


def check(shape: str, work: Path) -> dict:
    model, prefix, out = work / f"{shape}-model", work / f"{shape}-prefix", work / f"{shape}-out"
    result = {"shape": shape, "config": SHAPES[shape]}
    result["build"] = build_model(shape, model)
    build_prefix(model, prefix)
    print(f"{shape}: built {result['build']}", flush=True)
    exe = [sys.executable, "-m", "prefix_export.cli"]
    export = run_measured(exe + ["--model", str(model), "--prefix", str(prefix), "--out", str(out), "-q"])
    result["export"] = export
    print(f"{shape}: export exit {export['exit_code']}, {export['wall_s']} s, peak RSS {export['peak_rss_gb']} GB",
          flush=True)
    if export["exit_code"] == 0:
        report = json.loads((out / "export_report.json").read_text())
        validation = report["validation"]
        result["report"] = {"timing_s": report["timing_s"], "dtype": report["dtype"],
                            "graph": {k: report["graph"][k] for k in ("nodes", "weight_bytes", "external_data")},
                            "validation_passed": validation["passed"], "settings": validation["settings"],
                            "summary": validation["summary"],
                            "greedy": [{k: g.get(k) for k in ("new_tokens", "matching", "tie")}
                                       for g in validation["greedy"]]}
        generate = run_measured(exe + ["generate", str(out), "--token-ids", "1,45,74,31,34,38",
                                       "--max-new-tokens", "8", "--json"])
        result["generate"] = generate
        if generate["exit_code"] == 0:
            result["generate_tokens"] = json.loads(generate["stdout_tail"])["rows"][0]["new_token_ids"]
    result["weight_bytes"] = result["build"]["weight_bytes"]
    result["peak_rss_over_weights"] = round(export["peak_rss_gb"] * 1024**3 / result["weight_bytes"], 2)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", action="append", choices=sorted(SHAPES), help="default: llama2-7b and mistral-7b")
    parser.add_argument("--keep", help="work folder to keep (default: a temporary one, removed at the end)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    shapes = args.shape or ["llama2-7b", "mistral-7b"]
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="check-7b-"))
    memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    results = {"machine_memory_gb": round(memory_gb, 1), "cpus": os.cpu_count(), "checks": []}
    try:
        for shape in shapes:
            results["checks"].append(check(shape, work))
            if not args.keep:  # about 27 GB a shape (checkpoint + export): free it before the next
                for path in work.glob(f"{shape}-*"):
                    shutil.rmtree(path, ignore_errors=True)
            if args.json:
                Path(args.json).write_text(json.dumps(results, indent=2))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    for item in results["checks"]:
        report = item.get("report", {})
        timing = report.get("timing_s", {})
        greedy = ", ".join(f"{g['matching']}/{g['new_tokens']}" + (" (near-tie)" if g.get("tie") else "")
                           for g in report.get("greedy", []))
        print(f"{item['shape']}: {item['build']['parameters'] / 1e9:.2f}B parameters, {item['weight_bytes'] / 1e9:.1f} GB "
              f"fp16 in {item['build']['shards']} shards (built in {item['build']['build_s']} s); export exit "
              f"{item['export']['exit_code']}: export {timing.get('export')} s, validation {timing.get('validation')} s, "
              f"total {item['export']['wall_s']} s; peak RSS {item['export']['peak_rss_gb']} GB of "
              f"{results['machine_memory_gb']} GB ({item['peak_rss_over_weights']}x the weights); validation "
              f"{'PASSED' if report.get('validation_passed') else 'FAILED'}; greedy {greedy}; generate "
              f"{item.get('generate_tokens')}")
    return 0 if all(c["export"]["exit_code"] == 0 and c.get("generate_tokens") for c in results["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
