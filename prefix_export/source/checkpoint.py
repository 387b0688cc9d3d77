"""Read a prefix checkpoint (a PEFT adapter folder, or a raw PrefixEncoder state dict plus its config).

Whatever the form, the result is a `PrefixCheckpoint`: PEFT's `PrefixTuningConfig` and the
*projected* prefix, `prompt_embeddings` (P, L * 2 * token_dim), which is what PEFT itself stores in
an adapter folder and feeds its cache from. A checkpoint that still holds the projection MLP
(a raw PrefixEncoder saved in training mode) is run through PEFT's own `PrefixEncoder` once here.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import pickle
from pathlib import Path

import torch

from ..errors import CheckpointError, InputError, UnsafeCheckpointError

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
RAW_CONFIG_NAMES = ("prefix_config.json", ADAPTER_CONFIG)
# Key prefixes that wrap the PrefixEncoder's own names in the checkpoints people save by hand
# (`peft_model.state_dict()`, `peft_model.prompt_encoder.state_dict()`, ...).
_WRAPPER_PREFIXES = ("base_model.", "prompt_encoder.", "default.")

_OTHER_PEFT_ADVICE = {
    "LORA": "LoRA changes the weights, not the cache: merge it with `peft_model.merge_and_unload()` and export "
            "the merged model with any ONNX exporter (optimum, torch.onnx).",
    "PROMPT_TUNING": "prompt tuning prepends input embeddings, not keys/values; it is not a prefix.",
    "P_TUNING": "p-tuning prepends input embeddings produced by an encoder, not keys/values; it is not a prefix.",
}


@dataclasses.dataclass
class PrefixCheckpoint:
    config: object  # peft.PrefixTuningConfig
    prompt_embeddings: torch.Tensor  # (P, L * 2 * token_dim), float32 or the checkpoint's dtype
    kind: str  # "peft_adapter" or "prefix_encoder_state_dict"
    files: list[Path]  # every file read, for provenance hashes

    @property
    def num_virtual_tokens(self) -> int:
        return int(self.config.num_virtual_tokens)


def load_prefix_checkpoint(path: str | Path, config_path: str | Path | None = None) -> PrefixCheckpoint:
    """Load `path` (adapter folder, or a .safetensors/.pt/.bin state dict with `config_path`)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise InputError(f"--prefix {str(path)!r} does not exist; expected a PEFT adapter folder "
                         f"({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS[0]}) or a PrefixEncoder state dict file.")
    if path.is_dir():
        return _load_adapter_folder(path)
    return _load_raw_state_dict(path, config_path)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} could not be read ({exc}).") from exc
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); expected a PEFT PrefixTuningConfig.") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a JSON {type(data).__name__}, expected an object (a PEFT config).")
    return data


def _prefix_config(data: dict, source: Path):
    """A PrefixTuningConfig from JSON; names the PEFT type when it is not prefix tuning."""
    from peft import PrefixTuningConfig

    peft_type = str(data.get("peft_type", "")).upper()
    if peft_type != "PREFIX_TUNING":
        advice = _OTHER_PEFT_ADVICE.get(peft_type, "only PEFT prefix tuning (peft_type PREFIX_TUNING) is exported.")
        raise CheckpointError(f"{source} is a PEFT {peft_type or 'config without peft_type'} adapter, not prefix "
                              f"tuning. {advice}")
    task_type = data.get("task_type")
    if task_type not in (None, "CAUSAL_LM", "SEQ_2_SEQ_LM"):
        # Whether the task fits the model is checked against the registry in prefix_kv.check_fits.
        raise CheckpointError(f"{source} is a prefix for task {task_type}; this exporter handles CAUSAL_LM "
                              "(decoder-only) and SEQ_2_SEQ_LM (encoder-decoder) prefixes.")
    known = {f.name for f in dataclasses.fields(PrefixTuningConfig)}
    kwargs = {k: v for k, v in data.items() if k in known}
    kwargs["peft_type"] = "PREFIX_TUNING"
    try:
        config = PrefixTuningConfig(**kwargs)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{source}: not a valid PrefixTuningConfig ({exc}).") from exc
    for field in ("num_virtual_tokens", "num_layers", "token_dim", "num_attention_heads"):
        value = getattr(config, field, None)
        if not isinstance(value, int) or value <= 0:
            raise CheckpointError(f"{source}: {field} is {value!r}; a saved PrefixTuningConfig records it as a "
                                  "positive integer (PEFT fills it in when the adapter is created).")
    return config


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors, or from a pickle with weights_only=True (never unsafe unpickling)."""
    _check_readable(path)
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes); the checkpoint was not saved completely.")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{path} is not a readable safetensors file ({exc}); it may be truncated or "
                                  "corrupt. Save it again.") from exc
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(
            f"{path} needs unsafe unpickling (it holds objects other than tensors), which could run code, so it "
            f"was not loaded. Re-save only the tensors: `torch.save(state_dict, ...)` or safetensors. ({exc})") from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({exc}); it may be truncated.") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, expected a state dict of tensors.")
    return state


def _check_readable(path: Path) -> None:
    """Open the file once in Python, so a permission problem is named as such (safetensors' own
    reader would report it as an opaque deserialisation error)."""
    try:
        with open(path, "rb") as handle:
            handle.read(1)
    except OSError as exc:
        raise InputError(f"{path} cannot be read ({type(exc).__name__}: {exc.strerror or exc}); expected a readable "
                         "checkpoint file. Check its permissions.") from exc


def _strip_wrappers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        short = key
        changed = True
        while changed:
            changed = False
            for prefix in _WRAPPER_PREFIXES:
                if short.startswith(prefix):
                    short, changed = short[len(prefix):], True
        short = short.replace(".default.", ".")
        if short in out:
            raise CheckpointError(f"the checkpoint holds {key!r} and another key that both mean {short!r}; "
                                  "expected one tensor per PrefixEncoder parameter.")
        out[short] = value
    return out


def _prompt_embeddings(state: dict[str, torch.Tensor], config, source: Path) -> torch.Tensor:
    """(P, L * 2 * token_dim): stored as is, or computed by PEFT's PrefixEncoder (projection included)."""
    from peft.tuners.prefix_tuning.model import PrefixEncoder

    state = _strip_wrappers(state)
    width = config.num_layers * 2 * config.token_dim
    if set(state) == {"prompt_embeddings"}:
        embeddings = state["prompt_embeddings"]
    elif set(state) == {"embedding.weight"} and state["embedding.weight"].shape[-1] == width:
        embeddings = state["embedding.weight"]  # no projection: the embedding *is* the prefix
    elif "embedding.weight" in state and any(k.startswith("transform.") for k in state):
        encoder_config = dataclasses.replace(config, prefix_projection=True, inference_mode=False)
        encoder = PrefixEncoder(encoder_config)
        expected = set(encoder.state_dict())
        if set(state) != expected:
            raise CheckpointError(
                f"{source}: PrefixEncoder keys do not match. Missing: {sorted(expected - set(state)) or 'none'}; "
                f"unexpected: {sorted(set(state) - expected) or 'none'}.")
        try:
            encoder.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"{source}: PrefixEncoder weights do not fit its config ({exc}).") from exc
        _check_finite(state, source)
        with torch.no_grad():
            # The projection MLP runs once here; the graph only ever sees its output.
            embeddings = encoder(torch.arange(config.num_virtual_tokens).unsqueeze(0))[0]
    else:
        raise CheckpointError(
            f"{source}: no prefix found. Keys: {sorted(state)[:8]}; expected 'prompt_embeddings' (PEFT adapter) or "
            "a PrefixEncoder state dict ('embedding.weight' [+ 'transform.0/2.weight/bias']).")
    if not embeddings.is_floating_point():
        raise CheckpointError(f"{source}: the prefix tensor has dtype {str(embeddings.dtype).replace('torch.', '')}; "
                              "expected floating point (float32, float16 or bfloat16) prefix values.")
    expected_shape = (config.num_virtual_tokens, width)
    if tuple(embeddings.shape) != expected_shape:
        raise CheckpointError(
            f"{source}: the prefix tensor has shape {tuple(embeddings.shape)}, but its config (num_virtual_tokens="
            f"{config.num_virtual_tokens}, num_layers={config.num_layers}, token_dim={config.token_dim}) implies "
            f"{expected_shape}. The weights and config do not belong together.")
    _check_finite({"prefix": embeddings}, source)
    return embeddings.detach()


def _check_finite(state: dict[str, torch.Tensor], source: Path) -> None:
    for key, value in state.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            bad = int((~torch.isfinite(value)).sum())
            raise CheckpointError(f"{source}: {key} holds {bad} NaN/Inf values; the prefix training diverged or "
                                  "the file is corrupt. Export a checkpoint from before the divergence.")


def _load_adapter_folder(folder: Path) -> PrefixCheckpoint:
    config_file = folder / ADAPTER_CONFIG
    if not config_file.is_file():
        raise InputError(f"--prefix folder {folder} has no {ADAPTER_CONFIG}; expected a folder written by "
                         "PeftModel.save_pretrained().")
    config = _prefix_config(_read_json(config_file), config_file)
    weights = next((folder / n for n in ADAPTER_WEIGHTS if (folder / n).is_file()), None)
    if weights is None:
        raise InputError(f"--prefix folder {folder} has no {' or '.join(ADAPTER_WEIGHTS)}.")
    embeddings = _prompt_embeddings(_load_weights(weights), config, weights)
    return PrefixCheckpoint(config, embeddings, "peft_adapter", [config_file, weights])


def _load_raw_state_dict(path: Path, config_path: str | Path | None) -> PrefixCheckpoint:
    if path.suffix not in (".safetensors", ".pt", ".pth", ".bin"):
        raise InputError(f"--prefix {path} is a {path.suffix or 'suffix-less'} file; expected a PEFT adapter folder "
                         "or a PrefixEncoder state dict (.safetensors, .pt, .pth, .bin).")
    if config_path is None:
        config_path = next((path.parent / n for n in RAW_CONFIG_NAMES if (path.parent / n).is_file()), None)
        if config_path is None:
            raise InputError(f"--prefix {path} is a raw state dict but no PrefixTuningConfig JSON was given: pass "
                             f"--prefix-config, or put {RAW_CONFIG_NAMES[0]} beside it.")
    config_path = Path(config_path).expanduser()
    if not config_path.is_file():
        raise InputError(f"--prefix-config {config_path} does not exist.")
    config = _prefix_config(_read_json(config_path), config_path)
    embeddings = _prompt_embeddings(_load_weights(path), config, path)
    return PrefixCheckpoint(config, embeddings, "prefix_encoder_state_dict", [config_path, path])
