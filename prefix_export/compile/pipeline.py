"""The compile step: an exported graph -> the graph we ship (fused and/or at a reduced precision), and
the checks that decide whether it may ship.

    fp32 (+ fused)     validated against PEFT exactly like a plain export (logit tolerance, greedy
                       token for token, both layouts), plus the fusion counts the registry expects
    fp16, int8, int4   validated by agreement (compile/agreement.py) with PEFT and with the fp32 graph
                       they were made from, against documented thresholds

`api.compile_export` owns the folder (atomic output, the report); this module owns the graphs.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

from ..errors import InputError
from ..source.architectures import ArchSpec
from ..validate.report import ValidationReport
from .agreement import DEFAULT_THRESHOLDS, Thresholds
from .quantize import QuantizationSettings

log = logging.getLogger(__name__)

META_COMPILE = "prefix_export.compile"
KV_BUFFERS = ("concat", "shared")


@dataclasses.dataclass(frozen=True)
class CompileOptions:
    """What to do to the graph (`optimize`: fusions; `quantization.precision`) and how it is judged."""

    optimize: bool = False
    quantization: QuantizationSettings = QuantizationSettings()
    kv_buffer: str = "concat"  # "shared": GroupQueryAttention on one preallocated buffer (kv_buffer.py)
    thresholds: Thresholds | None = None  # default: DEFAULT_THRESHOLDS[precision]
    task_file: str | None = None  # prompt/target JSON lines: exact match must not drop (reduced precisions)
    prompts: int = 16
    greedy_prompts: int = 8
    greedy_tokens: int = 32

    def __post_init__(self):
        if self.kv_buffer not in KV_BUFFERS:
            raise InputError(f"--kv-buffer {self.kv_buffer!r}: choose one of {', '.join(KV_BUFFERS)}.")
        if self.kv_buffer == "shared" and not self.optimize:
            raise InputError("--kv-buffer shared rewrites the fused attention: add --optimize.")

    @property
    def precision(self) -> str:
        return self.quantization.precision

    @property
    def changes_graph(self) -> bool:
        return self.optimize or self.precision != "fp32"

    @property
    def limits(self) -> Thresholds | None:
        return self.thresholds or DEFAULT_THRESHOLDS.get(self.precision)

    def describe(self) -> dict:
        data = {"optimize": self.optimize, "quantization": self.quantization.to_dict(), "kv_buffer": self.kv_buffer}
        if self.precision != "fp32":
            data.update(thresholds=self.limits.to_dict(), task_file=self.task_file,
                        prompts=self.prompts, greedy_prompts=self.greedy_prompts, greedy_tokens=self.greedy_tokens)
        return data


def rotary_table_length(config: dict, num_virtual_tokens: int) -> int:
    """Rows of the rotary cos/sin tables a fused graph holds: the model's context plus the prefix."""
    return int(config.get("max_position_embeddings") or 4096) + num_virtual_tokens


def compile_graph(source_graph: Path, target_graph: Path, spec: ArchSpec, options: CompileOptions,
                  table_length: int, workdir: Path, num_virtual_tokens: int = 0,
                  layout: str = "folded") -> tuple[dict, Path]:
    """Write the compiled graph; returns (what was done, the fp32 graph it was made from).

    The fp32 graph is `source_graph`, or the fused (and shared-buffer) graph in `workdir` (the
    reference for agreement).
    """
    from .fusions import expected_fusions, fuse
    from .graphio import copy_metadata, load, save
    from .quantize import reduce_precision

    workdir.mkdir(parents=True, exist_ok=True)
    info: dict = {"optimize": options.optimize, "quantization": options.quantization.to_dict(),
                  "kv_buffer": options.kv_buffer}
    # What was done, in the graph's own metadata too (the graph may travel without its report). fuse is
    # strict, so a fused graph that is written holds every expected fusion: matched == expected.
    summary = {"optimize": options.optimize, "quantization": info["quantization"], "kv_buffer": options.kv_buffer}
    if options.optimize:
        summary["fusions"] = {kind: f"{n}/{n}" for kind, n in expected_fusions(spec)[0].items()}
    metadata = {META_COMPILE: json.dumps(summary, sort_keys=True)}
    fp32_graph = source_graph
    if options.kv_buffer == "shared":
        check_shareable(spec)
    if options.optimize:
        last = options.precision == "fp32" and options.kv_buffer == "concat"
        fused = target_graph if last else workdir / "fused.onnx"
        info["fusion"] = fuse(source_graph, fused, spec, table_length, metadata=metadata).to_dict()
        fp32_graph = fused
    if options.kv_buffer == "shared":
        from .kv_buffer import share_kv_buffer

        shared = target_graph if options.precision == "fp32" else workdir / "shared.onnx"
        model = load(fp32_graph)
        info["shared_kv_buffer"] = share_kv_buffer(model, num_virtual_tokens, layout, spec.sliding_window)
        save(model, shared)
        fp32_graph = shared
    if options.precision != "fp32":
        info["conversion"] = reduce_precision(fp32_graph, target_graph, options.quantization, metadata)
    elif not options.optimize:
        model = load(source_graph)
        copy_metadata(model, model, metadata)
        save(model, target_graph)
    return info, fp32_graph


def check_shareable(spec: ArchSpec) -> None:
    """The shared KV buffer rewrites the fused attention: families whose attention cannot fuse are refused."""
    reason = dict(spec.unfusable).get("attention")
    if reason:
        raise InputError(f"--kv-buffer shared needs fused attention, which {spec.model_type} does not have: "
                         f"{reason}. Compile it without --kv-buffer shared.")



def check_by_agreement(folder, fp32_graph: Path | None, peft_model, options: CompileOptions) -> ValidationReport:
    """A reduced-precision folder judged by agreement with PEFT (and the fp32 graph, when given)."""
    from ..runtime.decoder import make_decoder
    from ..runtime.sessions import create_session
    from .agreement import GraphScorer, PeftScorer, judge, measure, prompt_set, read_task_file, task_exact_match

    prefix = folder.read_prefix() if folder.layout == "cache" else None
    low_memory = options.precision == "fp16"

    def decoder(graph: Path):
        return make_decoder(create_session(graph, "cpu", low_memory=low_memory), prefix)

    candidate = GraphScorer(decoder(folder.graph), options.precision)
    references = [PeftScorer(peft_model)]
    if fp32_graph is not None:
        references.append(GraphScorer(make_decoder(create_session(fp32_graph, "cpu"), prefix), "fp32 graph"))
    tokenizer = folder.load_tokenizer()
    vocab = folder.vocab_size or candidate.decoder.vocab_size
    prompts = prompt_set(tokenizer, vocab, options.prompts)
    result = measure(candidate, references, prompts, options.greedy_prompts, options.greedy_tokens,
                     folder.eos_token_id)
    task = None
    if options.task_file:
        task = task_exact_match(candidate, references[-1], tokenizer, read_task_file(options.task_file))
        result["task"] = task
    result["thresholds"] = options.limits.to_dict()
    failures = judge(result, options.limits, task)
    return ValidationReport(problems=failures, agreement=result,
                            settings={"method": "agreement", **options.describe()})


def recheck_fusions(graph: Path, spec: ArchSpec) -> list[str]:
    """The fused graph still holds what the registry expects (`validate` on a compiled folder)."""
    from .fusions import count_fusions
    from .graphio import load

    counts, _ = count_fusions(load(graph), spec)
    return [f"fusion {kind} {got}/{want} (matched/expected)" for kind, (got, want) in counts.items() if got != want]


def options_from_report(compile_info: dict) -> CompileOptions:
    """The options a compiled folder was made with, for `validate` to recheck by the same criteria."""
    # The settings as QuantizationSettings.to_dict recorded them (lists back to tuples; extra keys such
    # as "bits" are derived, and what a precision does not record keeps its default)
    fields = {f.name for f in dataclasses.fields(QuantizationSettings)}
    settings = QuantizationSettings(**{k: tuple(v) if isinstance(v, list) else v
                                       for k, v in compile_info.get("quantization", {}).items() if k in fields})
    thresholds = compile_info.get("thresholds")
    return CompileOptions(optimize=compile_info.get("optimize", False), quantization=settings,
                          kv_buffer=compile_info.get("kv_buffer", "concat"),
                          thresholds=Thresholds(**thresholds) if thresholds else None,
                          task_file=compile_info.get("task_file"), prompts=compile_info.get("prompts", 16),
                          greedy_prompts=compile_info.get("greedy_prompts", 8),
                          greedy_tokens=compile_info.get("greedy_tokens", 32))


def check_compilable(report: dict, folder) -> None:
    """Refuse what compile cannot take, before any work."""
    if folder.is_seq2seq:
        raise InputError(f"{folder.path}: compile takes decoder-only exports; this is an encoder-decoder export "
                         "(its two graphs are not fused or quantized yet).")
    done = report.get("compile", {}).get("quantization", {}).get("precision", "fp32")
    if done != "fp32":
        raise InputError(f"{folder.path} is already a {done} graph; compile the fp32 export instead.")


def copy_side_files(source, target: Path, graph_files: set[str]) -> None:
    """Everything of the export folder but its graph files and report (the compiled graph replaces them)."""
    for path in source.files():
        relative = path.relative_to(source.path)
        if relative.name in graph_files or relative == source.report_file.relative_to(source.path):
            continue
        (target / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target / relative)
