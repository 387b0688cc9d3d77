"""Reference helpers written against PEFT's public API only."""
from __future__ import annotations

import json
from pathlib import Path

import torch


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
