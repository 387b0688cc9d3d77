"""The torch modules that are exported: each gives a prefix-tuned model a plain runtime contract.

Decoder-only (contract.py): the user's cache goes in and out without the prefix; inside the graph
the prefix keys/values (initializers) are prepended to every layer's cache, P ones to the mask, and
positions are shifted by P, exactly what PEFT does in `PeftModelForCausalLM.forward`. Without a
prefix the same module is the plain base decoder (the `--layout cache` graph).

Encoder-decoder (contract_seq2seq.py): the encoder alone, and the decoder with the prefix folded into
its self-attention; cross-attention K/V are concat(past encoder K/V, projection of
encoder_hidden_states), built by the model's own attention code (an EncoderDecoderCache whose cross
layers are marked not updated). Presents drop the prefix.

This module deliberately shares no code with validate/, whose reference is PEFT's own forward.
"""
from __future__ import annotations

import torch

from .. import contract, contract_seq2seq
from ..source import architectures
from ..source.prefix_kv import PrefixKV


class PrefixFoldedDecoder(torch.nn.Module):
    """Base causal LM + constant prefix KV, with the contract of `contract.py`.

    `prefix_kv=None` is the base model alone through the same contract (P = 0, no prefix
    initializers): the `--layout cache` graph, whose runtime feeds the prefix as the first past.
    """

    def __init__(self, model: torch.nn.Module, prefix_kv: PrefixKV | None, num_layers: int | None = None):
        super().__init__()
        self.model = model
        self.num_layers = prefix_kv.num_layers if prefix_kv is not None else num_layers
        self.num_virtual_tokens = prefix_kv.num_virtual_tokens if prefix_kv is not None else 0
        if prefix_kv is None:
            return
        # One (1, H_kv, P, D) buffer per layer and kind; each becomes a named initializer of the
        # graph (contract.prefix_initializer_name), so validation and tools can find the prefix.
        for i in range(self.num_layers):
            key, value = prefix_kv.layer(i)
            self.register_buffer(contract.prefix_initializer_name(i, "key"), key.unsqueeze(0).clone(),
                                 persistent=False)
            self.register_buffer(contract.prefix_initializer_name(i, "value"), value.unsqueeze(0).clone(),
                                 persistent=False)

    def forward(self, input_ids, attention_mask, position_ids, past_key_values: list[torch.Tensor]):
        batch = input_ids.shape[0]
        P = self.num_virtual_tokens
        layers = []
        for i in range(self.num_layers):
            key, value = past_key_values[2 * i], past_key_values[2 * i + 1]  # (B, H_kv, past, D)
            if P:
                # (1, H_kv, P, D) -> (B, H_kv, P, D), prepended to the user's past
                prefix_key = getattr(self, contract.prefix_initializer_name(i, "key")).expand(batch, -1, -1, -1)
                prefix_value = getattr(self, contract.prefix_initializer_name(i, "value")).expand(batch, -1, -1, -1)
                key, value = torch.cat([prefix_key, key], dim=2), torch.cat([prefix_value, value], dim=2)
            layers.append((key, value))
        cache = architectures.make_cache(layers, self.model.config)
        if P:
            # (B, P + past + seq): the prefix is always attended to; the user's positions come after it.
            attention_mask = torch.cat([torch.ones(batch, P, dtype=attention_mask.dtype, device=attention_mask.device),
                                        attention_mask], dim=1)
            position_ids = position_ids + P
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                         return_dict=True, **architectures.cache_kwargs(self.model, cache))
        presents = []
        for key, value in architectures.cache_to_tensors(architectures.output_cache(out)):
            presents += [key[:, :, P:], value[:, :, P:]] if P else [key, value]  # (B, H_kv, past + seq, D)
        return (out.logits, *presents)


class Seq2SeqEncoder(torch.nn.Module):
    """The base model's encoder alone: (input_ids, attention_mask) -> last_hidden_state."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.encoder = model.get_encoder()

    def forward(self, input_ids, attention_mask):
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask, return_dict=True).last_hidden_state


class PrefixFoldedSeq2SeqDecoder(torch.nn.Module):
    """Base seq2seq LM's decoder + constant self-attention prefix, with the contract of seq2seq_contract_seq2seq.py."""

    def __init__(self, model: torch.nn.Module, prefix_kv: PrefixKV):
        super().__init__()
        self.model = model
        self.num_layers = prefix_kv.num_layers
        self.num_virtual_tokens = prefix_kv.num_virtual_tokens
        # Layer i reads initializers prefix_decoder_{key,value}_{owner[i]}: layers whose prefix is
        # identical share one (PEFT's seq2seq layout repeats prefixes across layers, see
        # seq2seq_contract_seq2seq.prefix_owners), so the graph's initializers are the same whichever way
        # the ONNX optimiser treats duplicate constants.
        self.owners = contract_seq2seq.prefix_owners([prefix_kv.layer(i) for i in range(self.num_layers)])
        for i in sorted(set(self.owners)):
            key, value = prefix_kv.layer(i)  # each (H, P, D)
            self.register_buffer(contract_seq2seq.prefix_initializer_name(i, "key"), key.unsqueeze(0).clone(),
                                 persistent=False)
            self.register_buffer(contract_seq2seq.prefix_initializer_name(i, "value"), value.unsqueeze(0).clone(),
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
            name = contract_seq2seq.prefix_initializer_name
            prefix_key = getattr(self, name(owner, "key")).expand(batch, -1, -1, -1)
            prefix_value = getattr(self, name(owner, "value")).expand(batch, -1, -1, -1)
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
