"""Load the base language model (a hub id or a local folder) and, when it has one, its tokenizer."""
from __future__ import annotations

import dataclasses
import logging
import os
import pickle
from pathlib import Path

import torch

from . import architectures
from ..errors import InputError
from ..folder import load_tokenizer

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
           "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


@dataclasses.dataclass
class BaseModel:
    model: torch.nn.Module  # a transformers *ForCausalLM (or *ForConditionalGeneration for seq2seq) in eval mode
    spec: architectures.ArchSpec
    source: str  # what the user passed
    local_dir: Path | None  # where its files are (local folder or hub cache snapshot)
    tokenizer: object | None
    num_parameters: int = 0  # counted at load: still known after `release`
    released_config: object | None = None
    dtype_choice: object | None = None  # dtypes.DtypeChoice when a bfloat16 checkpoint was cast at load

    def __post_init__(self):
        if self.model is not None and not self.num_parameters:
            self.num_parameters = sum(p.numel() for p in self.model.parameters())

    @property
    def config(self):
        return self.model.config if self.model is not None else self.released_config

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def release(self) -> None:
        """Drop the weights (the config stays): once validation's references are computed, the PyTorch
        model must not sit beside ONNX Runtime's copy."""
        if self.model is None:
            return
        self.released_config = self.model.config
        # Free the weights themselves, not only our references: torch.onnx.export keeps references to
        # the parameters it traced (from objects that outlive the export; see export/exporter.py).
        for tensor in [*self.model.parameters(), *self.model.buffers()]:
            storage = tensor.untyped_storage()
            if storage.resizable():
                storage.resize_(0)
            else:  # memory-mapped from the checkpoint file: give its resident pages back instead
                _drop_pages(storage.data_ptr(), storage.nbytes())
        self.model = None


_MADV_DONTNEED = 4  # linux/mman.h


def _drop_pages(address: int, nbytes: int) -> None:
    """madvise(DONTNEED) the whole pages of a read-only memory-mapped range: they leave this process's
    resident memory and would be read from the file again if touched (they are not)."""
    import ctypes
    import mmap

    page = mmap.PAGESIZE
    start = (address + page - 1) // page * page
    end = (address + nbytes) // page * page
    if end <= start:
        return
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED)
    except (OSError, AttributeError):
        pass


def _looks_like_path(source: str) -> bool:
    return source.startswith((".", "/", "~")) or os.sep * 2 in source or source.count("/") > 1


def _resolve_dtype(dtype: str | None) -> torch.dtype | None:
    if dtype is None:
        return None
    if dtype not in _DTYPES:
        raise InputError(f"dtype {dtype!r} is not known; use one of {sorted(set(_DTYPES))}.")
    return _DTYPES[dtype]


def load_config(source: str):
    """The model's transformers config, with a clear error for a missing path or an uncached hub id."""
    from transformers import AutoConfig

    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise InputError(f"--model {source!r} is a file; expected a model folder (with config.json) or a hub id.")
        if not (path / "config.json").is_file():
            raise InputError(f"--model folder {source!r} has no config.json; expected a transformers model folder "
                             "saved with save_pretrained().")
        try:
            return AutoConfig.from_pretrained(str(path))
        except (OSError, ValueError, KeyError) as exc:
            raise InputError(f"--model folder {source!r}: config.json could not be read ({exc}).") from exc
    if _looks_like_path(source):
        raise InputError(f"--model {source!r} does not exist; expected a model folder or a hub id such as 'gpt2'.")
    try:
        return AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as exc:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")
        hint = ("hub access is off (HF_HUB_OFFLINE=1) and it is not in the local cache: download it once "
                "online, or pass a local folder") if offline else "check the name, your network and your token"
        raise InputError(f"--model {source!r} could not be loaded as a hub id: {hint}. ({exc})") from exc


def auto_model_class(spec: architectures.ArchSpec):
    """AutoModelForSeq2SeqLM for encoder-decoder families, AutoModelForCausalLM otherwise."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM if spec.is_seq2seq else AutoModelForCausalLM


def load_base_model(source: str | Path, dtype: str | None = None) -> BaseModel:
    """Load a causal or seq2seq LM for export; the registry is consulted before any weights are read."""
    source = str(source)  # a Path is fine too; the report records it as text
    config = load_config(source)
    spec = architectures.describe(config)
    kwargs = {}
    torch_dtype = _resolve_dtype(dtype)
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    path = Path(source).expanduser()
    from safetensors import SafetensorError

    try:
        model = auto_model_class(spec).from_pretrained(str(path) if path.exists() else source, **kwargs)
    except (OSError, ValueError, RuntimeError, EOFError, SafetensorError, pickle.UnpicklingError) as exc:
        # SafetensorError: a truncated or corrupt model.safetensors; UnpicklingError: a .bin that
        # weights_only=True refuses (transformers never unpickles arbitrary objects for us).
        raise InputError(f"--model {source!r}: the weights could not be loaded ({type(exc).__name__}: {exc}); "
                         "expected complete model.safetensors (or pytorch_model.bin) files saved with "
                         "save_pretrained(). Save or download the model again.") from exc
    model.eval()
    _check_finite_weights(model, source)
    choice = None
    if torch_dtype is None and next(model.parameters()).dtype == torch.bfloat16:
        # Saved in bfloat16 and no --dtype: float16 or float32, from the model's own numbers.
        from . import dtypes

        choice = dtypes.choose_for_bfloat16(model, spec.vocab_size, spec.float16_unsafe)
        dtypes.apply(model, choice)
    local_dir = path if path.exists() else _snapshot_dir(source)
    return BaseModel(model=model, spec=spec, source=source, local_dir=local_dir,
                     tokenizer=load_tokenizer(str(local_dir) if local_dir else source), dtype_choice=choice)


def _check_finite_weights(model: torch.nn.Module, source: str) -> None:
    for name, param in model.named_parameters():
        if param.is_floating_point() and not torch.isfinite(param).all():
            raise InputError(f"--model {source!r}: weight {name} holds NaN or Inf values; the model file is "
                             "corrupt or was saved after a diverged training step. Use a finite checkpoint.")


def _snapshot_dir(source: str) -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, local_files_only=True))
    except Exception:  # noqa: BLE001 - the cache layout is best effort; hashing just skips it
        return None




def build_tiny_model(config, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised causal or seq2seq LM from a config (tests, benchmarks); no hub access."""
    torch.manual_seed(seed)
    model = auto_model_class(architectures.describe(config)).from_config(config)
    return model.eval()


def wrap_model(model: torch.nn.Module, source: str = "<in-memory>", tokenizer=None) -> BaseModel:
    """A BaseModel around an already loaded model (library use and tests)."""
    spec = architectures.describe(model.config)
    return BaseModel(model=model.eval(), spec=spec, source=source, local_dir=None, tokenizer=tokenizer)
