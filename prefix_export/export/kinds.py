"""One object per export kind: what it exports, with which contract, and how it is run and validated.

    DecoderFolded   decoder-only, the prefix inside the graph (contract.py; runs like the base model)
    DecoderCache    decoder-only, the plain base decoder; the runtime feeds prefix_kv.safetensors as
                    the first past (`--layout cache`)
    Seq2Seq         encoder_model.onnx + decoder_model.onnx, the prefix folded into the decoder's
                    self-attention (contract_seq2seq.py)

Each kind owns its graphs' plans (wrapper, tracing inputs, names, dynamic axes), the report's `io`,
and how its folder is opened for validation and which validator checks it. They share one exporter
call (exporter.run_exporter), one post-processing (graph.finalize) and, in validate/, one guarded run.
"""
from __future__ import annotations

import torch

from .. import contract, contract_seq2seq
from ..errors import InputError, UnsupportedError
from ..folder import LAYOUTS, ExportFolder
from ..source.architectures import ArchSpec
from ..source.prefix_kv import PrefixKV
from . import wrappers
from .exporter import GraphPlan


def _decoder_inputs(spec: ArchSpec, dtype: torch.dtype, batch: int = 2, seq: int = 3, past: int = 4):
    """Tracing inputs; sizes are distinct so the exporter cannot confuse the dynamic axes."""
    H, D = spec.kv_shape
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, spec.vocab_size, (batch, seq), generator=generator)
    attention_mask = torch.ones(batch, past + seq, dtype=torch.int64)
    position_ids = torch.arange(past, past + seq, dtype=torch.int64).unsqueeze(0).expand(batch, -1).contiguous()
    pasts = [torch.randn(batch, H, past, D, generator=generator).to(dtype) for _ in range(2 * spec.num_layers)]
    return input_ids, attention_mask, position_ids, pasts


def _decoder_plan(module: torch.nn.Module, spec: ArchSpec, dtype: torch.dtype, graph_name: str) -> GraphPlan:
    from torch.export import Dim

    batch, seq = Dim(contract.BATCH), Dim(contract.SEQUENCE)
    past, total = Dim(contract.PAST, min=0), Dim(contract.TOTAL)
    dynamic_shapes = {
        "input_ids": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: total},
        "position_ids": {0: batch, 1: seq},
        "past_key_values": [{0: batch, 2: past}] * (2 * spec.num_layers),
    }
    return GraphPlan(graph_name, "decoder", module, _decoder_inputs(spec, dtype),
                     contract.input_names(spec.num_layers), contract.output_names(spec.num_layers), dynamic_shapes)


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise InputError(f"--layout {layout!r}: expected one of {', '.join(LAYOUTS)}.")


def _validation_session(graph, dtype: str):
    """A CPU session for validation; a half-precision graph's in low-memory mode (create_session)."""
    from ..runtime.sessions import create_session

    return create_session(graph, "cpu", low_memory=dtype != "float32")


class ExportKind:
    name: str
    layout: str = "folded"

    def graph_name(self, requested: str) -> str:
        """The decoder graph's file name, given what the user asked for (`--out OUT/NAME.onnx`)."""
        return requested

    def plans(self, model: torch.nn.Module, prefix_kv: PrefixKV, spec: ArchSpec, graph_name: str) -> list[GraphPlan]:
        raise NotImplementedError

    def io_names(self, spec: ArchSpec, graph_name: str) -> dict:
        raise NotImplementedError

    # Validation, in two phases: `reference` needs PEFT's model, `validate` only what `reference`
    # returned, so that a caller can free the PyTorch model in between when `frees_model` says so.
    frees_model = False

    def reference(self, peft_model, spec: ArchSpec, tolerances, settings=None):
        """Phase 1: what validation will compare against (PEFT's model itself, for kinds that need it)."""
        return peft_model

    def validate(self, folder: ExportFolder, reference, spec: ArchSpec, tolerances):
        """Phase 2: the folder's graphs on ONNX Runtime (CPU) against `reference`: a ValidationReport."""
        raise NotImplementedError


class DecoderFolded(ExportKind):
    name = "decoder, prefix folded into the graph"
    layout = "folded"

    def __init__(self, swappable: bool = False):
        # swappable: the prefix initializers are graph inputs too, replaceable by an adapter file
        self.swappable = swappable

    def wrapper(self, model, prefix_kv: PrefixKV | None, spec: ArchSpec) -> torch.nn.Module:
        # Looked up on the module at call time, so that tests can substitute a mutant wrapper.
        return wrappers.PrefixFoldedDecoder(model, prefix_kv, spec.num_layers)

    def plans(self, model, prefix_kv, spec, graph_name):
        plan = _decoder_plan(self.wrapper(model, prefix_kv, spec), spec, prefix_kv.tensor.dtype, graph_name)
        if self.swappable:
            plan.overridable = contract.prefix_initializer_names(spec.num_layers)
        return [plan]

    def io_names(self, spec, graph_name):
        inputs = contract.input_names(spec.num_layers)
        if self.swappable:
            inputs += contract.prefix_initializer_names(spec.num_layers)
        return {"inputs": inputs, "outputs": contract.output_names(spec.num_layers)}

    def open_for_validation(self, folder: ExportFolder, dtype: str = "float32"):
        """(the decoder validation drives, where its prefix is checked: {"graph_file"|"prefix_kv_file": path})."""
        from ..runtime.decoder import make_decoder

        return make_decoder(_validation_session(folder.graph, dtype)), {"graph_file": folder.graph}

    frees_model = True

    def reference(self, peft_model, spec, tolerances, settings=None):
        from ..validate.decoder import compute_reference
        from ..validate.report import ValidationSettings

        settings = settings or ValidationSettings()
        budget = spec.max_positions - peft_model.active_peft_config.num_virtual_tokens \
            if spec.positions == "learned" else None
        return compute_reference(peft_model, spec.vocab_size, tolerances.relative, max_positions=budget,
                                 **settings.kwargs())

    def validate(self, folder, reference, spec, tolerances):
        from ..validate.decoder import validate_graph

        decoder, where = self.open_for_validation(folder, reference.dtype)
        return validate_graph(decoder, reference, tolerances, **where)

    def validate_adapter(self, folder, adapter_file, reference, tolerances):
        """Phase 2 for another task's adapter file on this swappable graph, through ONNX Runtime's own
        adapter mechanism (RunOptions.add_active_adapter); the prefix check reads the adapter."""
        from ..runtime import adapters
        from ..runtime.decoder import make_decoder
        from ..validate.decoder import validate_graph

        decoder = make_decoder(_validation_session(folder.graph, reference.dtype))
        prefix = adapters.activate(decoder, adapter_file)
        return validate_graph(decoder, reference, tolerances, prefix_kv_file=prefix)


class DecoderCache(DecoderFolded):
    name = "decoder, prefix fed as the first past"
    layout = "cache"

    def wrapper(self, model, prefix_kv, spec):
        return wrappers.PrefixFoldedDecoder(model, None, spec.num_layers)  # the plain base decoder

    def open_for_validation(self, folder, dtype="float32"):
        from ..runtime.decoder import make_decoder

        decoder = make_decoder(_validation_session(folder.graph, dtype), folder.read_prefix())
        return decoder, {"prefix_kv_file": folder.prefix_file}


class Seq2Seq(ExportKind):
    name = "encoder-decoder, prefix folded into the decoder"
    layout = "folded"

    def graph_name(self, requested):
        return contract_seq2seq.DECODER_GRAPH  # optimum's names, whatever was asked

    def plans(self, model, prefix_kv, spec, graph_name):
        from torch.export import Dim

        generator = torch.Generator().manual_seed(0)
        encoder_args = (torch.randint(0, spec.vocab_size, (2, 7), generator=generator), torch.ones(2, 7, dtype=torch.int64))
        batch, sequence = Dim(contract_seq2seq.BATCH), Dim(contract_seq2seq.ENCODER_SEQUENCE)
        encoder = GraphPlan(contract_seq2seq.ENCODER_GRAPH, "encoder", wrappers.Seq2SeqEncoder(model), encoder_args,
                            contract_seq2seq.encoder_input_names(), contract_seq2seq.encoder_output_names(),
                            {"input_ids": {0: batch, 1: sequence}, "attention_mask": {0: batch, 1: sequence}})
        seq = Dim(contract_seq2seq.DECODER_SEQUENCE)
        new_encoder = Dim(contract_seq2seq.ENCODER_HIDDEN_SEQUENCE, min=0)
        past = Dim(contract_seq2seq.PAST_DECODER, min=0)
        past_encoder = Dim(contract_seq2seq.PAST_ENCODER, min=0)
        dynamic_shapes = {
            "input_ids": {0: batch, 1: seq},
            "encoder_attention_mask": {0: batch, 1: sequence},
            "encoder_hidden_states": {0: batch, 1: new_encoder},
            "past_self": [{0: batch, 2: past}] * (2 * spec.num_layers),
            "past_cross": [{0: batch, 2: past_encoder}] * (2 * spec.num_layers),
        }
        decoder = GraphPlan(contract_seq2seq.DECODER_GRAPH, "decoder",
                            wrappers.PrefixFoldedSeq2SeqDecoder(model, prefix_kv),
                            self._decoder_inputs(spec, prefix_kv.tensor.dtype),
                            contract_seq2seq.decoder_input_names(spec.num_layers),
                            contract_seq2seq.decoder_output_names(spec.num_layers), dynamic_shapes)
        return [encoder, decoder]

    @staticmethod
    def _decoder_inputs(spec: ArchSpec, dtype: torch.dtype, batch: int = 2, seq: int = 3, past: int = 4,
                        past_encoder: int = 5, new_encoder: int = 6):
        """Sizes are distinct so the exporter cannot confuse axes; both cross parts are non-empty (never
        the case at run time) so neither is specialised to 0."""
        H, D = spec.kv_shape
        generator = torch.Generator().manual_seed(0)
        input_ids = torch.randint(0, spec.vocab_size, (batch, seq), generator=generator)
        encoder_attention_mask = torch.ones(batch, past_encoder + new_encoder, dtype=torch.int64)
        encoder_hidden_states = torch.randn(batch, new_encoder, spec.hidden_size, generator=generator).to(dtype)
        past_self = [torch.randn(batch, H, past, D, generator=generator).to(dtype) for _ in range(2 * spec.num_layers)]
        past_cross = [torch.randn(batch, H, past_encoder, D, generator=generator).to(dtype)
                      for _ in range(2 * spec.num_layers)]
        return input_ids, encoder_attention_mask, encoder_hidden_states, past_self, past_cross

    def io_names(self, spec, graph_name):
        return {contract_seq2seq.ENCODER_GRAPH: {"inputs": contract_seq2seq.encoder_input_names(),
                                                 "outputs": contract_seq2seq.encoder_output_names()},
                contract_seq2seq.DECODER_GRAPH: {"inputs": contract_seq2seq.decoder_input_names(spec.num_layers),
                                                 "outputs": contract_seq2seq.decoder_output_names(spec.num_layers)}}

    def reference(self, peft_model, spec, tolerances, settings=None):
        # The seq2seq validator computes PEFT's references (model dtype and float64) as it goes:
        # it keeps the model, with the settings. Encoder-decoder models here are small.
        from ..validate.report import ValidationSettings

        return peft_model, settings or ValidationSettings()

    def validate(self, folder, reference, spec, tolerances):
        from ..runtime.decoder import OnnxSeq2Seq
        from ..runtime.sessions import create_session
        from ..validate.seq2seq import validate_seq2seq

        peft_model, settings = reference
        model = OnnxSeq2Seq(create_session(folder.encoder_graph, "cpu"), create_session(folder.graph, "cpu"))
        return validate_seq2seq(model, peft_model, spec, tolerances, decoder_graph=folder.graph,
                                **settings.kwargs())


def kind_for(spec: ArchSpec, layout: str = "folded", swappable_prefix: bool = False) -> ExportKind:
    """The export kind of `spec` in `layout`; a clear error for what does not exist."""
    check_layout(layout)
    if swappable_prefix and (spec.is_seq2seq or layout != "folded"):
        raise UnsupportedError(
            "--swappable-prefix is for the folded layout of decoder-only models: "
            + (f"{spec.model_type}'s decoder prefix is not swappable yet (encoder-decoder exports)." if spec.is_seq2seq
               else "a cache-layout export already takes any task's prefix as its first past "
                    "(`prefix-export generate OUT --prefix-kv TASK/prefix_kv.safetensors`)."))
    if spec.is_seq2seq:
        if layout != "folded":
            raise UnsupportedError(f"--layout {layout} is for decoder-only models; {spec.model_type} is exported "
                                   "as an encoder + folded-prefix decoder (the default --layout folded).")
        return Seq2Seq()
    return DecoderCache() if layout == "cache" else DecoderFolded(swappable_prefix)
