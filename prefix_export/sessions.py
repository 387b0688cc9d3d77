"""The session factory: an export folder + a provider name -> an ONNX Runtime session, nothing hidden.

A missing provider is an error listing what is installed, unless the user asked for a fallback
(`fallback="cpu"`), in which case the switch is logged as a warning. ONNX Runtime itself silently
drops a provider whose libraries fail to load; we check which provider the session really got and
treat a silent drop the same way.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from . import contract, providers
from .errors import InputError, RuntimeSetupError
from .runtime import graph_path

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH = 8
REPORT_FILE = "export_report.json"  # = api.REPORT_FILE (api imports this module's users)
DEFAULT_MAX_TOTAL = 1024  # when the config gives no position limit (rotary models)


@dataclasses.dataclass
class SessionSettings:
    provider: str = "cpu"
    fallback: str | None = None  # "cpu": use the CPU, with a warning, when `provider` cannot be used
    max_batch: int = DEFAULT_MAX_BATCH  # TensorRT profile
    max_total_length: int | None = None  # TensorRT profile; default: the model's position limit
    fp16: bool = False  # TensorRT builds fp16 engines
    cache_dir: str | Path | None = None  # TensorRT engine/timing caches; default OUT_DIR/trt_cache
    device_id: int = 0
    threads: int | None = None  # intra-op threads (CPU)
    tf32: bool = False  # CUDA matmuls in TF32 (faster, not fp32-exact)


@dataclasses.dataclass
class ExportFacts:
    """What the runtime needs to know about an export folder, read without loading any weights."""

    folder: Path
    graph: Path
    layout: str  # "folded" | "cache"
    num_virtual_tokens: int
    max_positions: int | None  # position table rows (learned positions), else None
    eos_token_id: int | None
    pad_token_id: int | None
    sliding_window: int | None = None  # attention window (cache positions), from the report


def _first(value):
    return value[0] if isinstance(value, list) and value else value


def read_facts(folder: str | Path, graph: str | Path | None = None) -> ExportFacts:
    """Layout, P, position limit and special tokens of an export folder; clear error when it is not one.
    `graph`: which graph of the folder (an encoder-decoder folder has two; the decoder holds the prefix)."""
    from .graph import read_metadata

    folder = Path(folder)
    graph = Path(graph) if graph is not None else graph_path(folder)
    metadata = read_metadata(graph)
    if contract.META_PREFIX_LENGTH not in metadata:
        raise RuntimeSetupError(f"{graph} has no {contract.META_PREFIX_LENGTH!r} metadata; it was not written by "
                                "prefix-export. Expected an export folder (model.onnx, prefix_kv.safetensors, "
                                "export_report.json).")
    layout = metadata.get(contract.META_LAYOUT, "folded")
    config, generation = {}, {}
    folder = graph.parent
    if (folder / "config.json").is_file():
        config = json.loads((folder / "config.json").read_text())
    if (folder / "generation_config.json").is_file():
        generation = json.loads((folder / "generation_config.json").read_text())
    eos = _first(generation.get("eos_token_id", config.get("eos_token_id")))
    pad = _first(generation.get("pad_token_id", config.get("pad_token_id")))
    # The position limit: the registry's verdict, recorded in the report ("learned" positions have a
    # table of max_positions rows; rotary/alibi have none). Without a report, the config's n_positions.
    report = json.loads((folder / REPORT_FILE).read_text()) if (folder / REPORT_FILE).is_file() else {}
    architecture = report.get("architecture") or {}
    if architecture:
        max_positions = architecture.get("max_positions") if architecture.get("positions") == "learned" else None
    else:
        max_positions = config.get("n_positions")
    return ExportFacts(folder, graph, layout, int(metadata[contract.META_PREFIX_LENGTH]), max_positions, eos, pad,
                       architecture.get("sliding_window"))


@dataclasses.dataclass
class OpenedSession:
    session: object  # onnxruntime.InferenceSession
    provider: str  # the provider the session really runs on
    requested: str
    fell_back: bool
    limits: providers.ShapeLimits | None  # the TensorRT profile, when TensorRT runs it
    options: dict[str, str]

    @property
    def device(self) -> str:
        return providers.device_of(self.provider)


def build_provider_options(facts: ExportFacts, provider: str, settings: SessionSettings):
    """(options, limits) for `provider`; limits only for TensorRT, whose profile they define."""
    if provider == providers.TENSORRT:
        max_total = settings.max_total_length or facts.max_positions or DEFAULT_MAX_TOTAL
        min_past = facts.num_virtual_tokens if facts.layout == "cache" else 0
        if facts.layout != "cache":
            log.warning("TensorRT with the folded layout: the first step's past is zero-length, which some "
                        "TensorRT versions reject; export with --layout cache for TensorRT")
        limits = providers.ShapeLimits(settings.max_batch, max_total, min_past=min_past)
        cache_dir = Path(settings.cache_dir) if settings.cache_dir else facts.folder / providers.TRT_CACHE_DIR
        options = providers.tensorrt_options(providers.graph_inputs(facts.graph), limits, cache_dir,
                                             fp16=settings.fp16, device_id=settings.device_id)
        return options, limits
    if provider == providers.CUDA:
        return providers.cuda_options(settings.device_id, settings.tf32), None
    return {}, None


def open_session(folder: str | Path, settings: SessionSettings | None = None,
                 facts: ExportFacts | None = None) -> OpenedSession:
    """A session on the requested provider, or on the CPU when that fails and `settings.fallback` says so."""
    settings = settings or SessionSettings()
    facts = facts or read_facts(folder)
    if settings.fallback not in (None, "cpu"):
        raise InputError(f"--fallback {settings.fallback!r}: the only fallback is 'cpu'.")
    try:
        provider = providers.resolve_provider(settings.provider)
        options, limits = build_provider_options(facts, provider, settings)
        session = _create(facts.graph, provider, options, settings)
    except RuntimeSetupError as exc:
        if settings.fallback != "cpu":
            raise
        log.warning("falling back to the CPU as asked (--fallback cpu): %s", exc)
        session = _create(facts.graph, providers.CPU, {}, settings)
        return OpenedSession(session, providers.CPU, settings.provider, True, None, {})
    return OpenedSession(session, provider, settings.provider, False, limits, options)


def _create(graph: Path, provider: str, options: dict[str, str], settings: SessionSettings):
    import onnxruntime as ort

    session_options = ort.SessionOptions()
    session_options.log_severity_level = 3
    if settings.threads:
        session_options.intra_op_num_threads = settings.threads
    available = providers.available_providers()
    chain = [(name, opts) for name, opts in providers.provider_chain(provider, options)
             if name == provider or name in available]
    if provider == providers.TENSORRT:
        for key in ("trt_engine_cache_path", "trt_timing_cache_path"):
            Path(options[key]).mkdir(parents=True, exist_ok=True)
    try:
        session = ort.InferenceSession(str(graph), session_options, providers=[n for n, _ in chain],
                                       provider_options=[o for _, o in chain])
    except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
        raise RuntimeSetupError(f"ONNX Runtime could not load {graph} on {provider}: {exc}") from exc
    active = session.get_providers()
    if active[0] != provider:
        raise RuntimeSetupError(f"ONNX Runtime did not start {provider} for {graph} (it runs on {active}); its "
                                "libraries (CUDA, cuDNN, TensorRT) are probably missing or of the wrong version.")
    log.info("session on %s (%s)", provider, ", ".join(active))
    return session
