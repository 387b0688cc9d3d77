"""`prefix-export inspect`: what would be exported (shapes, sizes, graph I/O), without exporting."""
from __future__ import annotations

from .. import contract, contract_seq2seq
from .base_model import load_base_model
from .checkpoint import load_prefix_checkpoint
from .prefix_kv import check_fits, describe_conversion


def _checkpoint_line(checkpoint) -> str:
    if checkpoint.is_prefix:
        return f"{checkpoint.kind}, projection {'on' if checkpoint.config.prefix_projection else 'off'}"
    details = {key: value for key, value in describe_conversion(checkpoint).items()
               if key in ("prompt_tuning_init", "encoder_reparameterization_type", "task_id")}
    return ", ".join([checkpoint.kind] + [f"{key.replace('_', ' ')} {value}" for key, value in details.items()])


def inspect_export_plan(model: str, prefix: str, prefix_config: str | None = None, task_id: int | None = None) -> dict:
    base = load_base_model(model)
    checkpoint = load_prefix_checkpoint(prefix, prefix_config, task_id)
    check_fits(base, checkpoint)
    spec = base.spec
    P = checkpoint.num_virtual_tokens
    element = base.model.dtype.itemsize if hasattr(base.model.dtype, "itemsize") else 4
    prefix_bytes = spec.num_layers * 2 * spec.num_kv_heads * P * spec.head_dim * element
    names = contract.input_names(spec.num_layers)
    outputs = contract.output_names(spec.num_layers)
    graph_io = {
        "graph inputs": names[:3] + [f"{names[3]} ... {names[-1]} (batch, {spec.num_kv_heads}, past, {spec.head_dim})"],
        "graph outputs": outputs[:1] + [f"{outputs[1]} ... {outputs[-1]} (batch, {spec.num_kv_heads}, total, "
                                        f"{spec.head_dim})"],
    }
    if spec.is_seq2seq:
        seq2seq_contract = contract_seq2seq
        names = seq2seq_contract.decoder_input_names(spec.num_layers)
        outputs = seq2seq_contract.decoder_output_names(spec.num_layers)
        graph_io = {
            "encoder layers": spec.num_encoder_layers,
            "graphs": [seq2seq_contract.ENCODER_GRAPH, seq2seq_contract.DECODER_GRAPH],
            "encoder graph": f"{', '.join(seq2seq_contract.encoder_input_names())} -> "
                             f"{', '.join(seq2seq_contract.encoder_output_names())}",
            "decoder graph inputs": names[:3] + [f"{names[3]} ... {names[-1]} (batch, {spec.num_kv_heads}, "
                                                 f"past, {spec.head_dim})"],
            "decoder graph outputs": outputs[:1] + [f"{outputs[1]} ... {outputs[-1]} (batch, {spec.num_kv_heads}, "
                                                    f"total, {spec.head_dim})"],
        }
    return {
        "architecture": spec.model_type,
        "layers": spec.num_layers,
        "attention heads": spec.num_attention_heads,
        "KV heads": spec.num_kv_heads,
        "head dim": spec.head_dim,
        "hidden size": spec.hidden_size,
        "positions": spec.positions + (f" (table of {spec.max_positions})" if spec.max_positions else ""),
        "model parameters": sum(p.numel() for p in base.model.parameters()),
        "dtype": str(base.model.dtype).replace("torch.", ""),
        "prefix (P)": P,
        "method": checkpoint.method,
        "conversion": describe_conversion(checkpoint)["conversion"],
        "prefix checkpoint": _checkpoint_line(checkpoint),
        "prefix parameters (stored)": checkpoint.prompt_embeddings.numel(),
        "prefix KV shape": f"({spec.num_layers}, 2, {spec.num_kv_heads}, {P}, {spec.head_dim}) (L, 2, H_kv, P, D)",
        "prefix KV bytes": prefix_bytes,
        **graph_io,
    }
