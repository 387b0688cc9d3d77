"""Reference helpers written against PEFT's public API only."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

PROMPT = np.array([5, 17, 42, 9, 64, 3, 77], dtype=np.int64)


def load_raw_encoder_into(base, state_path: Path):
    """A PeftModelForCausalLM/ForSeq2SeqLM (training mode, projection as saved) with a raw PrefixEncoder state dict."""
    from peft import PrefixTuningConfig, get_peft_model

    config = json.loads((Path(state_path).parent / "prefix_config.json").read_text())
    peft_config = PrefixTuningConfig(task_type=config.get("task_type") or "CAUSAL_LM",
                                     num_virtual_tokens=config["num_virtual_tokens"],
                                     prefix_projection=config["prefix_projection"],
                                     encoder_hidden_size=config["encoder_hidden_size"])
    model = get_peft_model(base, peft_config)
    if str(state_path).endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(str(state_path))
    else:
        state = torch.load(state_path, weights_only=True)
    model.prompt_encoder["default"].load_state_dict(state, strict=True)
    return model.eval()


def peft_greedy(peft_model, prompt: np.ndarray, steps: int):
    """Greedy on PEFT's forward, whole sequence each step. Returns tokens and first-step logits."""
    tokens = torch.from_numpy(prompt)[None]
    new, first_logits = [], None
    with torch.no_grad():
        for _ in range(steps):
            logits = peft_model(input_ids=tokens, attention_mask=torch.ones_like(tokens)).logits[0, -1]
            if first_logits is None:
                first_logits = logits.numpy()
            next_token = int(logits.argmax())
            new.append(next_token)
            tokens = torch.cat([tokens, torch.tensor([[next_token]])], dim=1)
    return new, first_logits


def ort_greedy(graph_path, prompt: np.ndarray, steps: int):
    """A plain ORT loop following the contract: user tokens only, positions from 0, presents fed back."""
    session = ort.InferenceSession(str(graph_path), providers=["CPUExecutionProvider"])
    pasts = [i for i in session.get_inputs() if i.name.startswith("past_key_values.")]
    feeds = {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32) for i in pasts}
    ids = prompt[None]
    mask = np.ones((1, len(prompt)), np.int64)
    positions = np.arange(len(prompt), dtype=np.int64)[None]
    output_names = [o.name for o in session.get_outputs()]
    new, first_logits = [], None
    for _ in range(steps):
        feeds.update(input_ids=ids, attention_mask=mask, position_ids=positions)
        outputs = dict(zip(output_names, session.run(None, feeds)))
        logits = outputs["logits"][0, -1]
        if first_logits is None:
            first_logits = logits
        next_token = int(logits.argmax())
        new.append(next_token)
        for past in pasts:
            feeds[past.name] = outputs[past.name.replace("past_key_values", "present")]
        ids = np.array([[next_token]], np.int64)
        positions = positions[:, -1:] + 1
        mask = np.concatenate([mask, [[1]]], axis=1)
    return new, first_logits


def run_cli(args, capsys):
    """Run the CLI in-process: (exit code, stderr + stdout). Paths may be given as Path objects."""
    from prefix_export.cli import main

    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.err + captured.out


def export_args(model, prefix, out, *extra):
    """CLI arguments exporting `model` + `prefix` to `out/export`, quietly."""
    return ["--model", model, "--prefix", prefix, "--out", out / "export", "-q", *extra]


# ---- broken or altered copies of a PEFT adapter folder (bad-input tests) ----------------------------


def copy_adapter(src: Path, dst: Path, weights: bytes | None = None, config: dict | None = None) -> Path:
    """A copy of adapter folder `src` at `dst`, with other weight bytes and/or another config if given."""
    dst.mkdir(parents=True)
    text = (src / "adapter_config.json").read_text()
    (dst / "adapter_config.json").write_text(json.dumps(config) if config is not None else text)
    (dst / "adapter_model.safetensors").write_bytes(
        weights if weights is not None else (src / "adapter_model.safetensors").read_bytes())
    return dst


def adapter_with_state(src: Path, dst: Path, state: dict) -> Path:
    from safetensors.torch import save_file

    copy_adapter(src, dst)
    save_file(state, str(dst / "adapter_model.safetensors"))
    return dst


def adapter_state(src: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(src / "adapter_model.safetensors"))


# ---- bad input: what a refused export must leave behind (nothing) --------------------------------


def assert_nothing_written(out_parent):
    leftovers = [p.name for p in out_parent.iterdir()] if out_parent.exists() else []
    assert leftovers == [], f"bad input left {leftovers} behind"


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def assert_refused(code, text, out, *patterns):
    """Exit 2, every pattern in the message, and nothing at all under the output parent."""
    assert code == 2, text
    for pattern in patterns:
        assert re.search(pattern, text), f"{pattern!r} not in:\n{text}"
    assert "Traceback" not in text
    assert listing(out) == [], f"bad input left {listing(out)} behind"


class RunsCode:
    """Unpickling this would run a command; it must never be unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def genai_greedy(model, prompt: list[int], max_new_tokens: int, adapters=None, adapter: str | None = None) -> list[int]:
    """What a genai user writes: Model(folder) (or an already loaded og.Model), greedy search options,
    optionally an adapter made active (`og.Adapters` + `set_active_adapter`), the prompt, step."""
    import onnxruntime_genai as og

    model = model if isinstance(model, og.Model) else og.Model(str(model))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + max_new_tokens)
    generator = og.Generator(model, params)
    if adapter is not None:
        generator.set_active_adapter(adapters, adapter)
    generator.append_tokens(np.array([prompt], dtype=np.int32))
    new = []
    while not generator.is_done():
        generator.generate_next_token()
        new.append(int(generator.get_next_tokens()[0]))
    return new
