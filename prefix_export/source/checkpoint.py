"""Read a prompt-learning checkpoint (a PEFT adapter folder, or a raw encoder state dict plus its config).

Whatever the form, the result is a `PrefixCheckpoint`: PEFT's config and what PEFT itself stores in
an adapter folder, `prompt_embeddings`. For prefix tuning that is the *projected* prefix
(P, L * 2 * token_dim), which PEFT feeds its cache from; a checkpoint that still holds the projection
MLP (a raw PrefixEncoder saved in training mode) is run through PEFT's own `PrefixEncoder` once here.
For prompt tuning, p-tuning and multitask prompt tuning it is the virtual token embeddings
(P, token_dim) that PEFT prepends to the input embeddings (p-tuning: the output of its MLP/LSTM
`PromptEncoder`, run once here when a raw encoder is given); prefix_kv.py turns them into keys/values.
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

# The methods exported (peft_type -> the name the report and `inspect` use). Prefix tuning stores
# keys/values; the others store virtual token embeddings that become keys/values (prefix_kv.py).
PREFIX_TUNING, PROMPT_TUNING, P_TUNING, MULTITASK = ("prefix_tuning", "prompt_tuning", "p_tuning",
                                                     "multitask_prompt_tuning")
METHODS = {"PREFIX_TUNING": PREFIX_TUNING, "PROMPT_TUNING": PROMPT_TUNING, "P_TUNING": P_TUNING,
           "MULTITASK_PROMPT_TUNING": MULTITASK}
EXPORTED = "prefix tuning, prompt tuning, p-tuning and multitask prompt tuning (peft_type " + \
    ", ".join(METHODS) + ")"
_MERGE = ("changes the model's weights, not its cache or inputs: merge it with `peft_model.merge_and_unload()` and "
          "export the merged model with any ONNX exporter (optimum, torch.onnx).")
_WEIGHT_METHODS = ("LORA", "ADALORA", "LOHA", "LOKR", "OFT", "BOFT", "IA3", "VERA", "FOURIERFT", "HRA", "VBLORA",
                   "LN_TUNING", "RANDLORA", "SHIRA", "C3A", "MISS", "ROAD", "WAVEFT", "DELORA", "GRALORA")
_OTHER_PEFT_ADVICE = {
    **{name: f"{name} {_MERGE}" for name in _WEIGHT_METHODS},
    "LORA": f"LoRA {_MERGE}",
    "ADAPTION_PROMPT": "adaption prompt (LLaMA-Adapter) adds gated attention over learned prompts inside the top "
                       "layers, which a plain decoder graph cannot express; it has no merged form to export.",
    "CPT": "context-aware prompt tuning (CPT) is not exported yet; prompt tuning (PROMPT_TUNING) is.",
}


@dataclasses.dataclass
class PrefixCheckpoint:
    # the PEFT config: PrefixTuningConfig, PromptTuningConfig, PromptEncoderConfig or MultitaskPromptTuningConfig
    config: object
    # prefix tuning: (P, L * 2 * token_dim), the projected prefix; the other methods: (P, token_dim), the
    # virtual token embeddings (multitask: the shared ones, before the task's factors)
    prompt_embeddings: torch.Tensor
    kind: str  # "peft_adapter" or "prefix_encoder_state_dict" / "prompt_encoder_state_dict"
    files: list[Path]  # every file read, for provenance hashes
    method: str = PREFIX_TUNING  # a value of METHODS
    # multitask prompt tuning: prefix_task_cols (T, P, r), prefix_task_rows (T, r, token_dim), and the task chosen
    task_tensors: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    task_id: int | None = None

    @property
    def num_virtual_tokens(self) -> int:
        return int(self.config.num_virtual_tokens)

    @property
    def is_prefix(self) -> bool:
        """Prefix tuning (keys/values stored); otherwise virtual token embeddings."""
        return self.method == PREFIX_TUNING


def load_prefix_checkpoint(path: str | Path, config_path: str | Path | None = None,
                           task_id: int | None = None) -> PrefixCheckpoint:
    """Load `path` (adapter folder, or a .safetensors/.pt/.bin state dict with `config_path`);
    `task_id` chooses the task of a multitask prompt-tuning checkpoint (and is refused for the others)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise InputError(f"--prefix {str(path)!r} does not exist; expected a PEFT adapter folder "
                         f"({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS[0]}) or a PrefixEncoder/PromptEncoder state dict file.")
    checkpoint = _load_adapter_folder(path) if path.is_dir() else _load_raw_state_dict(path, config_path)
    _choose_task(checkpoint, task_id, path)
    return checkpoint


def _choose_task(checkpoint: PrefixCheckpoint, task_id: int | None, source: Path) -> None:
    if checkpoint.method != MULTITASK:
        if task_id is not None:
            raise InputError(f"--task-id {task_id} chooses a task of a multitask prompt-tuning checkpoint; {source} is "
                             f"{checkpoint.method.replace('_', ' ')}, which has one prompt. Drop --task-id.")
        return
    tasks = int(checkpoint.task_tensors["prefix_task_cols"].shape[0])
    if task_id is None or not 0 <= task_id < tasks:
        raise InputError(f"{source} is a multitask prompt-tuning checkpoint with {tasks} tasks; one graph holds one "
                         f"task's prompt: choose it with --task-id (0..{tasks - 1})"
                         + (f", not {task_id}." if task_id is not None else "."))
    checkpoint.task_id = task_id


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


def _peft_config(data: dict, source: Path):
    """The PEFT config of an exported method from JSON (and its method); names the PEFT type otherwise."""
    import peft

    peft_type = str(data.get("peft_type", "")).upper()
    method = METHODS.get(peft_type)
    if method is None:
        advice = _OTHER_PEFT_ADVICE.get(peft_type, "")
        raise CheckpointError(f"{source} is a PEFT {peft_type or 'config without peft_type'} adapter, which "
                              f"prefix-export does not export{': ' + advice if advice else '.'} It exports {EXPORTED}.")
    task_type = data.get("task_type")
    if task_type not in (None, "CAUSAL_LM", "SEQ_2_SEQ_LM"):
        # Whether the task fits the model is checked against the registry in prefix_kv.check_fits.
        raise CheckpointError(f"{source} is a prefix for task {task_type}; this exporter handles CAUSAL_LM "
                              "(decoder-only) and SEQ_2_SEQ_LM (encoder-decoder) prefixes.")
    config_class = {PREFIX_TUNING: peft.PrefixTuningConfig, PROMPT_TUNING: peft.PromptTuningConfig,
                    P_TUNING: peft.PromptEncoderConfig, MULTITASK: peft.MultitaskPromptTuningConfig}[method]
    known = {f.name for f in dataclasses.fields(config_class)}
    kwargs = {k: v for k, v in data.items() if k in known}
    kwargs["peft_type"] = peft_type
    try:
        config = config_class(**kwargs)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{source}: not a valid {config_class.__name__} ({exc}).") from exc
    # Prefix tuning shapes its stored tensor by every one of these; the others by P and token_dim only.
    required = ("num_virtual_tokens", "num_layers", "token_dim", "num_attention_heads") if method == PREFIX_TUNING \
        else ("num_virtual_tokens", "token_dim")
    for field in required:
        value = getattr(config, field, None)
        if not isinstance(value, int) or value <= 0:
            raise CheckpointError(f"{source}: {field} is {value!r}; a saved {config_class.__name__} records it as a "
                                  "positive integer (PEFT fills it in when the adapter is created).")
    if getattr(config, "modules_to_save", None):
        raise CheckpointError(f"{source}: the adapter also trains base-model modules ({config.modules_to_save}, "
                              "modules_to_save), which prefix-export does not export; save those modules into the base "
                              "model and the prompt without them.")
    return config, method


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


def _virtual_token_embeddings(state: dict[str, torch.Tensor], config, method: str, source: Path):
    """(embeddings (P, token_dim), task tensors): as stored, or computed by PEFT's own p-tuning PromptEncoder
    (its MLP or LSTM head run once here) from a raw encoder state dict."""
    from peft.tuners.p_tuning.model import PromptEncoder

    state = _strip_wrappers(state)
    rows = config.num_virtual_tokens * (config.num_transformer_submodules or 1)
    task_keys = {"prefix_task_cols", "prefix_task_rows"} if method == MULTITASK else set()
    tasks = {k: state.pop(k) for k in task_keys if k in state}
    if task_keys and set(tasks) != task_keys:
        raise CheckpointError(f"{source}: a multitask prompt-tuning checkpoint holds prefix_task_cols and "
                              f"prefix_task_rows; missing: {sorted(task_keys - set(tasks))}.")
    heads = [k for k in state if k.startswith(("mlp_head.", "lstm_head."))]
    if set(state) in ({"prompt_embeddings"}, {"embedding.weight"}):
        embeddings = next(iter(state.values()))
    elif method == P_TUNING and "embedding.weight" in state and heads:
        encoder = PromptEncoder(dataclasses.replace(config, inference_mode=False))
        expected, head = set(encoder.state_dict()), config.encoder_reparameterization_type
        if set(state) != expected:
            raise CheckpointError(
                f"{source}: PromptEncoder ({getattr(head, 'value', head)}) keys do not match. Missing: "
                f"{sorted(expected - set(state)) or 'none'}; unexpected: {sorted(set(state) - expected) or 'none'}.")
        _check_finite(state, source)
        try:
            encoder.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"{source}: PromptEncoder weights do not fit its config ({exc}).") from exc
        with torch.no_grad():
            # The MLP/LSTM runs once here (what PEFT saves in an adapter folder); the graph never sees it.
            embeddings = encoder.eval()(torch.arange(rows).unsqueeze(0))[0]
    else:
        raise CheckpointError(
            f"{source}: no virtual token embeddings found. Keys: {sorted(state)[:8]}; expected 'prompt_embeddings' "
            "(PEFT adapter), 'embedding.weight' (a prompt embedding), or a p-tuning PromptEncoder state dict "
            "('embedding.weight' + 'mlp_head.*' [+ 'lstm_head.*']).")
    if not embeddings.is_floating_point():
        raise CheckpointError(f"{source}: the virtual token embeddings have dtype "
                              f"{str(embeddings.dtype).replace('torch.', '')}; expected floating point.")
    if tuple(embeddings.shape) != (rows, config.token_dim):
        raise CheckpointError(
            f"{source}: the virtual token embeddings have shape {tuple(embeddings.shape)}, but the config "
            f"(num_virtual_tokens={config.num_virtual_tokens}, token_dim={config.token_dim}) implies "
            f"{(rows, config.token_dim)}. The weights and config do not belong together.")
    if tasks:
        cols, rows_ = tasks["prefix_task_cols"], tasks["prefix_task_rows"]
        want = ((config.num_tasks, rows, config.num_ranks), (config.num_tasks, config.num_ranks, config.token_dim))
        if (tuple(cols.shape), tuple(rows_.shape)) != want:
            raise CheckpointError(f"{source}: prefix_task_cols/rows have shapes {tuple(cols.shape)}/"
                                  f"{tuple(rows_.shape)}; the config (num_tasks, P, num_ranks, token_dim) implies "
                                  f"{want[0]}/{want[1]}.")
    _check_finite({"virtual token embeddings": embeddings, **tasks}, source)
    return embeddings.detach(), {k: v.detach() for k, v in tasks.items()}


def _read_checkpoint(config_data: dict, config_file: Path, weights: Path, kind: str) -> PrefixCheckpoint:
    config, method = _peft_config(config_data, config_file)
    state = _load_weights(weights)
    if method == PREFIX_TUNING:
        return PrefixCheckpoint(config, _prompt_embeddings(state, config, weights), kind, [config_file, weights])
    embeddings, tasks = _virtual_token_embeddings(state, config, method, weights)
    if kind != "peft_adapter":
        kind = "prompt_encoder_state_dict"
    return PrefixCheckpoint(config, embeddings, kind, [config_file, weights], method, tasks)


def _load_adapter_folder(folder: Path) -> PrefixCheckpoint:
    config_file = folder / ADAPTER_CONFIG
    if not config_file.is_file():
        raise InputError(f"--prefix folder {folder} has no {ADAPTER_CONFIG}; expected a folder written by "
                         "PeftModel.save_pretrained().")
    data = _read_json(config_file)
    weights = next((folder / n for n in ADAPTER_WEIGHTS if (folder / n).is_file()), None)
    if weights is None:
        _peft_config(data, config_file)  # a method that is not exported is named first
        raise InputError(f"--prefix folder {folder} has no {' or '.join(ADAPTER_WEIGHTS)}.")
    return _read_checkpoint(data, config_file, weights, "peft_adapter")


def _load_raw_state_dict(path: Path, config_path: str | Path | None) -> PrefixCheckpoint:
    if path.suffix not in (".safetensors", ".pt", ".pth", ".bin"):
        raise InputError(f"--prefix {path} is a {path.suffix or 'suffix-less'} file; expected a PEFT adapter folder "
                         "or an encoder state dict (.safetensors, .pt, .pth, .bin).")
    if config_path is None:
        config_path = next((path.parent / n for n in RAW_CONFIG_NAMES if (path.parent / n).is_file()), None)
        if config_path is None:
            raise InputError(f"--prefix {path} is a raw state dict but no PEFT config JSON was given: pass "
                             f"--prefix-config, or put {RAW_CONFIG_NAMES[0]} beside it.")
    config_path = Path(config_path).expanduser()
    if not config_path.is_file():
        raise InputError(f"--prefix-config {config_path} does not exist.")
    return _read_checkpoint(_read_json(config_path), config_path, path, "prefix_encoder_state_dict")
