"""Encoder-decoder export: the encoder graph, and the folded-prefix decoder graph (seq2seq_contract.py).

    encoder_model.onnx   input_ids, attention_mask -> last_hidden_state   (no prefix: PEFT gives the
                         encoder none)
    decoder_model.onnx   input_ids, encoder_attention_mask, encoder_hidden_states,
                         past_key_values.{i}.decoder/encoder.key/value
                         -> logits, present.{i}.decoder/encoder.key/value

Inside the decoder, layer i's self-attention cache is [prefix_decoder_{key,value}_i ; user past]
(the prefix is P positions, initializers), so positions (BART's learned table, T5's relative bias)
count from P as in PEFT's forward; cross-attention K/V are concat(past encoder K/V, projection of
encoder_hidden_states), built by the model's own attention code (an EncoderDecoderCache whose
cross layers are marked not updated). Presents drop the prefix. This module shares no code with
`validate_seq2seq.py`, whose reference is PEFT's own forward.
"""
from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

import torch

from . import architectures
from . import seq2seq_contract as contract
from .errors import ExportFailedError
from .prefix_kv import PrefixKV

log = logging.getLogger(__name__)


class Seq2SeqEncoder(torch.nn.Module):
    """The base model's encoder alone: (input_ids, attention_mask) -> last_hidden_state."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.encoder = model.get_encoder()

    def forward(self, input_ids, attention_mask):
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask, return_dict=True).last_hidden_state


class PrefixFoldedSeq2SeqDecoder(torch.nn.Module):
    """Base seq2seq LM's decoder + constant self-attention prefix, with the contract of seq2seq_contract.py."""

    def __init__(self, model: torch.nn.Module, prefix_kv: PrefixKV):
        super().__init__()
        self.model = model
        self.num_layers = prefix_kv.num_layers
        self.num_virtual_tokens = prefix_kv.num_virtual_tokens
        # Layer i reads initializers prefix_decoder_{key,value}_{owner[i]}: layers whose prefix is
        # identical share one (PEFT's seq2seq layout repeats prefixes across layers, see
        # seq2seq_contract.prefix_owners), so the graph's initializers are the same whichever way
        # the ONNX optimiser treats duplicate constants.
        self.owners = contract.prefix_owners([prefix_kv.layer(i) for i in range(self.num_layers)])
        for i in sorted(set(self.owners)):
            key, value = prefix_kv.layer(i)  # each (H, P, D)
            self.register_buffer(contract.prefix_initializer_name(i, "key"), key.unsqueeze(0).clone(),
                                 persistent=False)
            self.register_buffer(contract.prefix_initializer_name(i, "value"), value.unsqueeze(0).clone(),
                                 persistent=False)

    def forward(self, input_ids, encoder_attention_mask, encoder_hidden_states,
                past_self: list[torch.Tensor], past_cross: list[torch.Tensor]):
        from transformers.modeling_outputs import BaseModelOutput

        batch = input_ids.shape[0]
        P = self.num_virtual_tokens
        self_layers, cross_layers = [], []
        for i in range(self.num_layers):
            # (1, H, P, D) -> (B, H, P, D), prepended to the user's past (B, H, past, D)
            owner = self.owners[i]
            prefix_key = getattr(self, contract.prefix_initializer_name(owner, "key")).expand(batch, -1, -1, -1)
            prefix_value = getattr(self, contract.prefix_initializer_name(owner, "value")).expand(batch, -1, -1, -1)
            self_layers.append((torch.cat([prefix_key, past_self[2 * i]], dim=2),
                                torch.cat([prefix_value, past_self[2 * i + 1]], dim=2)))
            cross_layers.append((past_cross[2 * i], past_cross[2 * i + 1]))  # (B, H, 0 or S_enc, D)
        cache = architectures.make_encoder_decoder_cache(self_layers, cross_layers)
        # Cross-attention length: past encoder K/V + new encoder states; one of the two is 0.
        cross_length = past_cross[0].shape[2] + encoder_hidden_states.shape[1]
        # (B, S_enc) -> (B, cross_length): equal at run time; an index_select (not a slice) so the
        # exporter does not tie the mask's length to the two inputs it is the sum of.
        cross_mask = encoder_attention_mask.index_select(
            1, torch.arange(cross_length, device=encoder_attention_mask.device))
        # The model would size its cross-attention mask from encoder_hidden_states, empty after the
        # first step; the registry says what to pass instead in this transformers version.
        embeds = self.model.get_input_embeddings()(input_ids)  # only batch, query length, dtype are read
        mask = architectures.cross_attention_mask(self.model, embeds, cross_mask)
        out = self.model(encoder_outputs=BaseModelOutput(last_hidden_state=encoder_hidden_states),
                         attention_mask=mask, decoder_input_ids=input_ids, use_cache=True, return_dict=True,
                         **architectures.cache_kwargs(self.model, cache))
        self_out, cross_out = architectures.encoder_decoder_cache_tensors(architectures.output_cache(out))
        presents = []
        for key, value in self_out:
            presents += [key[:, :, P:], value[:, :, P:]]  # drop the prefix: (B, H, past + seq, D)
        for key, value in cross_out:
            presents += [key, value]  # (B, H, S_enc, D)
        return (out.logits, *presents)


def _example_decoder_inputs(spec: architectures.ArchSpec, dtype: torch.dtype, batch: int = 2, seq: int = 3,
                            past: int = 4, past_encoder: int = 5, new_encoder: int = 6):
    """Tracing inputs. Sizes are distinct so the exporter cannot confuse axes; both cross parts are
    non-empty (never the case at run time) so neither is specialised to 0."""
    H, D = spec.kv_shape
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, spec.vocab_size, (batch, seq), generator=generator)
    encoder_attention_mask = torch.ones(batch, past_encoder + new_encoder, dtype=torch.int64)
    encoder_hidden_states = torch.randn(batch, new_encoder, spec.hidden_size, generator=generator).to(dtype)
    past_self = [torch.randn(batch, H, past, D, generator=generator).to(dtype) for _ in range(2 * spec.num_layers)]
    past_cross = [torch.randn(batch, H, past_encoder, D, generator=generator).to(dtype)
                  for _ in range(2 * spec.num_layers)]
    return input_ids, encoder_attention_mask, encoder_hidden_states, past_self, past_cross


def _run_exporter(module: torch.nn.Module, args: tuple, path: Path, opset: int, input_names: list[str],
                  output_names: list[str], dynamic_shapes, what: str) -> None:
    log.info("torch.onnx.export (dynamo) %s -> %s", what, path)
    captured = io.StringIO()
    try:
        with torch.no_grad(), contextlib.redirect_stdout(captured):
            torch.onnx.export(module, args, str(path), dynamo=True, opset_version=opset, input_names=input_names,
                              output_names=output_names, dynamic_shapes=dynamic_shapes, optimize=True,
                              external_data=True, verbose=False)
    except Exception as exc:  # noqa: BLE001 - the exporter raises many types; one typed error for users
        raise ExportFailedError(f"torch.onnx.export failed for the {what} of a {module.__class__.__name__}: "
                                f"{type(exc).__name__}: {exc}\nexporter output:\n{captured.getvalue()[-2000:]}") from exc
    log.debug("exporter output:\n%s", captured.getvalue())


def export_encoder(model: torch.nn.Module, spec: architectures.ArchSpec, path: Path, opset: int) -> None:
    from torch.export import Dim

    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, spec.vocab_size, (2, 7), generator=generator)
    attention_mask = torch.ones(2, 7, dtype=torch.int64)
    batch, sequence = Dim(contract.BATCH), Dim(contract.ENCODER_SEQUENCE)
    dynamic_shapes = {"input_ids": {0: batch, 1: sequence}, "attention_mask": {0: batch, 1: sequence}}
    _run_exporter(Seq2SeqEncoder(model).eval(), (input_ids, attention_mask), path, opset,
                  contract.encoder_input_names(), contract.encoder_output_names(), dynamic_shapes, "encoder")


def export_decoder(model: torch.nn.Module, prefix_kv: PrefixKV, spec: architectures.ArchSpec, path: Path,
                   opset: int) -> None:
    from torch.export import Dim

    args = _example_decoder_inputs(spec, prefix_kv.tensor.dtype)
    batch, seq = Dim(contract.BATCH), Dim(contract.DECODER_SEQUENCE)
    encoder_length = Dim(contract.ENCODER_SEQUENCE)
    new_encoder = Dim(contract.ENCODER_HIDDEN_SEQUENCE, min=0)
    past, past_encoder = Dim(contract.PAST_DECODER, min=0), Dim(contract.PAST_ENCODER, min=0)
    dynamic_shapes = {
        "input_ids": {0: batch, 1: seq},
        "encoder_attention_mask": {0: batch, 1: encoder_length},
        "encoder_hidden_states": {0: batch, 1: new_encoder},
        "past_self": [{0: batch, 2: past}] * (2 * spec.num_layers),
        "past_cross": [{0: batch, 2: past_encoder}] * (2 * spec.num_layers),
    }
    _run_exporter(PrefixFoldedSeq2SeqDecoder(model, prefix_kv).eval(), args, path, opset,
                  contract.decoder_input_names(spec.num_layers), contract.decoder_output_names(spec.num_layers),
                  dynamic_shapes, "decoder")


def export_graphs(model: torch.nn.Module, prefix_kv: PrefixKV, spec: architectures.ArchSpec, raw_dir: Path,
                  out_dir: Path, metadata: dict[str, str], opset: int, external_data: bool) -> dict:
    """Export both graphs into `raw_dir`, finalize them (metadata, checker) into `out_dir`.

    Returns graph.finalize's info summed over the two graphs (what the report's `graph` holds for
    a single-graph export), with each graph's own info under `parts`.
    """
    from . import graph

    parts = {}
    for name, export in ((contract.ENCODER_GRAPH, lambda path: export_encoder(model, spec, path, opset)),
                         (contract.DECODER_GRAPH, lambda path: export_decoder(model, prefix_kv, spec, path, opset))):
        export(raw_dir / name)
        parts[name] = graph.finalize(raw_dir / name, out_dir / name, metadata, external_data)
    external = [info["external_data"] for info in parts.values() if info["external_data"]]
    return {"graph": " + ".join(parts), "external_data": ", ".join(external) or None,
            "weight_bytes": sum(info["weight_bytes"] for info in parts.values()),
            "nodes": sum(info["nodes"] for info in parts.values()), "opset": parts[contract.DECODER_GRAPH]["opset"],
            "bfloat16_ops_upcast": sum(info["bfloat16_ops_upcast"] for info in parts.values()), "parts": parts}


def io_names(spec: architectures.ArchSpec) -> dict:
    """The report's `io` section: graph -> inputs/outputs."""
    return {contract.ENCODER_GRAPH: {"inputs": contract.encoder_input_names(),
                                     "outputs": contract.encoder_output_names()},
            contract.DECODER_GRAPH: {"inputs": contract.decoder_input_names(spec.num_layers),
                                     "outputs": contract.decoder_output_names(spec.num_layers)}}
