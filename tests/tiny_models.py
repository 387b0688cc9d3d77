"""Factories for tiny models and prefixes, shared by the tests (and by tools/ checks)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

# One tiny config per registered architecture; test_architectures fails when one is missing.
TINY_CONFIGS = {
    "gpt2": dict(n_layer=2, n_head=4, n_embd=32, vocab_size=128, n_positions=128, bos_token_id=1, eos_token_id=2),
}


def tiny_config(model_type: str, **overrides):
    from transformers import AutoConfig

    kwargs = dict(TINY_CONFIGS[model_type])
    kwargs.update(overrides)
    return AutoConfig.for_model(model_type, **kwargs)


def save_tiny_model(config, folder: Path, seed: int = 0) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(folder)
    return model


def make_prefix(model_dir: Path, out: Path, num_virtual_tokens: int, projection: bool, trained: bool,
                kind: str = "peft_adapter", seed: int = 0, steps: int = 8) -> Path:
    """A prefix for the model in `model_dir`, trained a few steps (or random), saved as `kind`.

    kind "peft_adapter": PeftModel.save_pretrained(out) (adapter_config.json + adapter_model.safetensors).
    kind "raw_safetensors" / "raw_pt": the PrefixEncoder's own state dict (projection MLP included)
    as out/prefix_encoder.{safetensors,pt} + out/prefix_config.json. Returns the path to pass as --prefix.
    """
    from peft import PrefixTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens,
                                prefix_projection=projection, encoder_hidden_size=24)
    peft_model = get_peft_model(model, config)
    encoder = peft_model.prompt_encoder["default"]
    with torch.no_grad():  # PEFT initialises near zero; make the prefix matter from step 0
        for param in encoder.parameters():
            param.normal_(0.0, 0.5)
    if trained:
        optimizer = torch.optim.Adam(encoder.parameters(), lr=1e-2)
        generator = torch.Generator().manual_seed(seed)
        vocab = model.config.vocab_size
        for _ in range(steps):
            batch = torch.randint(0, vocab, (4, 12), generator=generator)
            loss = peft_model(input_ids=batch, attention_mask=torch.ones_like(batch), labels=batch).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    peft_model.eval()
    out.mkdir(parents=True, exist_ok=True)
    if kind == "peft_adapter":
        peft_model.save_pretrained(out)
        return out
    state = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
    config_dict = peft_model.peft_config["default"].to_dict()
    config_dict["inference_mode"] = False
    (out / "prefix_config.json").write_text(json.dumps(_jsonable(config_dict), indent=2))
    if kind == "raw_safetensors":
        from safetensors.torch import save_file

        save_file(state, str(out / "prefix_encoder.safetensors"))
        return out / "prefix_encoder.safetensors"
    if kind == "raw_pt":
        torch.save(state, out / "prefix_encoder.pt")
        return out / "prefix_encoder.pt"
    raise ValueError(kind)


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    if dataclasses.is_dataclass(value):
        return _jsonable(dataclasses.asdict(value))
    if hasattr(value, "value"):  # enums
        return value.value
    return value
