"""The session factory: an export folder + a provider name -> an ONNX Runtime session, nothing hidden.

A missing provider is an error listing what is installed, unless the user asked for a fallback
(`fallback="cpu"`), in which case the switch is logged as a warning. ONNX Runtime itself silently
drops a provider whose libraries fail to load; we check which provider the session really got and
treat a silent drop the same way.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from . import providers
from ..errors import InputError, RuntimeSetupError
from ..folder import ExportFolder

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH = 8
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
    cuda_graph: bool = False  # CUDA: decode steps of a shared-KV-buffer graph replayed as one CUDA graph


@dataclasses.dataclass
class OpenedSession:
    session: object  # onnxruntime.InferenceSession
    provider: str  # the provider the session really runs on
    requested: str
    fell_back: bool
    limits: providers.ShapeLimits | None  # the TensorRT profile, when TensorRT runs it
    options: dict[str, str]
    cuda_graph: bool = False  # made with enable_cuda_graph (decode steps captured once, then replayed)

    @property
    def device(self) -> str:
        return providers.device_of(self.provider)


def build_provider_options(folder: ExportFolder, provider: str, settings: SessionSettings):
    """(options, limits) for `provider`; limits only for TensorRT, whose profile they define."""
    if provider == providers.TENSORRT:
        max_total = settings.max_total_length or folder.max_positions or DEFAULT_MAX_TOTAL
        min_past = folder.num_virtual_tokens if folder.layout == "cache" else 0
        if folder.layout != "cache":
            log.warning("TensorRT with the folded layout: the first step's past is zero-length, which some "
                        "TensorRT versions reject; export with --layout cache for TensorRT")
        limits = providers.ShapeLimits(settings.max_batch, max_total, min_past=min_past)
        cache_dir = Path(settings.cache_dir) if settings.cache_dir else folder.path / providers.TRT_CACHE_DIR
        options = providers.tensorrt_options(providers.graph_inputs(folder.graph), limits, cache_dir,
                                             fp16=settings.fp16, device_id=settings.device_id)
        return options, limits
    if provider == providers.CUDA:
        return providers.cuda_options(settings.device_id, settings.tf32), None
    return {}, None


def open_session(folder: ExportFolder | str | Path, settings: SessionSettings | None = None,
                 graph: Path | None = None) -> OpenedSession:
    """A session on `folder`'s decoder graph (or `graph`, another graph of the folder) on the requested
    provider, or on the CPU when that fails and `settings.fallback` says so."""
    folder = folder if isinstance(folder, ExportFolder) else ExportFolder.open(folder)
    settings = settings or SessionSettings()
    graph = graph or folder.graph
    if settings.fallback not in (None, "cpu"):
        raise InputError(f"--fallback {settings.fallback!r}: the only fallback is 'cpu'.")
    try:
        provider = providers.resolve_provider(settings.provider)
        options, limits = build_provider_options(folder, provider, settings)
        if settings.cuda_graph and _cuda_graph_possible(graph, provider):
            try:
                session = create_session(graph, provider, {**options, "enable_cuda_graph": "1"}, settings.threads)
                return OpenedSession(session, provider, settings.provider, False, limits, options, cuda_graph=True)
            except RuntimeSetupError as exc:
                log.warning("CUDA graphs are not possible for %s, decode steps run uncaptured: %s", graph, exc)
        session = create_session(graph, provider, options, settings.threads,
                                 low_memory=_needs_low_memory(folder, graph, provider))
    except RuntimeSetupError as exc:
        if settings.fallback != "cpu":
            raise
        log.warning("falling back to the CPU as asked (--fallback cpu): %s", exc)
        session = create_session(graph, providers.CPU, {}, settings.threads,
                                 low_memory=_needs_low_memory(folder, graph, providers.CPU))
        return OpenedSession(session, providers.CPU, settings.provider, True, None, {})
    return OpenedSession(session, provider, settings.provider, False, limits, options)


def _cuda_graph_possible(graph: Path, provider: str) -> bool:
    """CUDA graphs need the CUDA provider and fixed shapes and addresses, which only a shared-KV-buffer graph
    (compile --kv-buffer shared) has; otherwise a log line says why the steps run uncaptured."""
    from ..contract import is_shared_buffer_graph

    if provider != providers.CUDA:
        log.warning("--cuda-graph: only the CUDA provider captures CUDA graphs; %s runs uncaptured", provider)
        return False
    if not is_shared_buffer_graph(providers.graph_inputs(graph)):
        log.warning("--cuda-graph: %s changes shape every step (its cache grows); CUDA graphs need a graph "
                    "compiled with --kv-buffer shared. Running uncaptured.", graph)
        return False
    return True


def available_memory_bytes() -> int | None:
    """What the kernel says can still be allocated without swapping (Linux); None elsewhere."""
    try:
        meminfo = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    return int(meminfo.split("MemAvailable:")[1].split()[0]) * 1024


def _needs_low_memory(folder: ExportFolder, graph: Path, provider: str) -> bool:
    """Whether a CPU session on a half-precision graph must be a low-memory one (create_session).

    At ONNX Runtime's full optimization level it keeps a float32 copy of the weights (about 2.1x the
    graph's bytes at peak, measured) and is then about 3x faster per step, so that is used whenever
    the copy fits in the memory available now (with 512 MB to spare); unknown memory counts as not."""
    if provider != providers.CPU or folder.dtype == "float32":
        return False
    graph_bytes, available = folder.graph_bytes(graph), available_memory_bytes()
    if available is not None and 2.2 * graph_bytes + 512 * 1024**2 < available:
        return False
    log.info("%s graph on the CPU: a low-memory session, slower (a float32 copy of its %.1f GB of weights "
             "would not fit in the %.1f GB available)", folder.dtype, graph_bytes / 1e9, (available or 0) / 1e9)
    return True


def create_session(graph: str | Path, provider: str = "cpu", options: dict[str, str] | None = None,
                   threads: int | None = None, low_memory: bool = False):
    """The one place an ONNX Runtime session is made: `provider` (a partial name is fine) first, then the
    providers it falls back to for nodes it cannot run (providers.provider_chain); a provider that
    ONNX Runtime silently dropped is an error, not a quiet CPU run.

    `low_memory` is for a half-precision graph on the CPU provider, which has no float16 kernels for
    most ops and puts a Cast to float32 before each weight's consumer. Measured on a 1.1B float16
    graph (2.2 GB of weights, memory-mapped), peak RSS of one 8-token step:
    - full optimization level: the casts are constant-folded, a float32 copy of every weight is
      kept: 4.6 GB (a 7B graph: 27 GB more, killed on a 24 GB machine);
    - extended level, default execution order: the weight casts have no input dependency, so they
      run up front and their float32 outputs pile up: 4.0 GB;
    - extended level, priority-based order, no memory arena: each cast runs just before its
      consumer and is freed right after: 2.3 GB, and 1.6x faster than the default order.
    """
    import onnxruntime as ort

    provider = providers.resolve_provider(provider)
    options = options or {}
    session_options = ort.SessionOptions()
    session_options.log_severity_level = 3
    # One op at a time, each over the intra-op threads: a decoder step is a chain, not a tree.
    session_options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    session_options.inter_op_num_threads = 1
    if threads:
        session_options.intra_op_num_threads = threads
    if low_memory:
        session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        session_options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
        # Without its arena ONNX Runtime returns each temporary (a weight's float32 cast) at once.
        session_options.enable_cpu_mem_arena = False
        session_options.enable_mem_pattern = False
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
