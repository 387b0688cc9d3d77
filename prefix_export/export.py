"""The folded-prefix wrapper module and its `torch.onnx.export` (dynamo) call.

The wrapper makes a plain decoder contract out of a prefix-tuned model: the user's cache goes in and
out without the prefix, and inside the graph the prefix keys/values (initializers) are prepended to
every layer's cache, P ones are prepended to the mask, and positions are shifted by P, which is
exactly what PEFT does in `PeftModelForCausalLM.forward`. This module deliberately shares no code
with `validate.py`, whose reference is PEFT's own forward.
"""
from __future__ import annotations

import contextlib
import errno
import io
import logging
from pathlib import Path

import torch

from . import architectures, contract
from .errors import ExportFailedError
from .prefix_kv import PrefixKV

log = logging.getLogger(__name__)

DEFAULT_OPSET = 18


class PrefixFoldedDecoder(torch.nn.Module):
    """Base causal LM + constant prefix KV, with the contract of `contract.py`.

    `prefix_kv=None` exports the base model alone through the same wrapper and contract (P = 0, no
    prefix initializers): what `bench` compares against to show what the prefix costs.
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
        if P == 0:
            return self._forward_base(input_ids, attention_mask, position_ids, past_key_values)
        layers = []
        for i in range(self.num_layers):
            # (1, H_kv, P, D) -> (B, H_kv, P, D), then prepend to the user's past (B, H_kv, past, D)
            prefix_key = getattr(self, contract.prefix_initializer_name(i, "key")).expand(batch, -1, -1, -1)
            prefix_value = getattr(self, contract.prefix_initializer_name(i, "value")).expand(batch, -1, -1, -1)
            layers.append((torch.cat([prefix_key, past_key_values[2 * i]], dim=2),
                           torch.cat([prefix_value, past_key_values[2 * i + 1]], dim=2)))
        cache = architectures.make_cache(layers, self.model.config)
        # (B, P + past + seq): the prefix is always attended to.
        mask = torch.cat([torch.ones(batch, P, dtype=attention_mask.dtype, device=attention_mask.device),
                          attention_mask], dim=1)
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids + P, use_cache=True,
                         return_dict=True, **architectures.cache_kwargs(self.model, cache))
        presents = []
        for key, value in architectures.cache_to_tensors(architectures.output_cache(out)):
            presents += [key[:, :, P:], value[:, :, P:]]  # drop the prefix: (B, H_kv, past + seq, D)
        return (out.logits, *presents)

    def _forward_base(self, input_ids, attention_mask, position_ids, past_key_values: list[torch.Tensor]):
        """No prefix: the plain decoder, same contract (the past is (B, H_kv, past, D) as given)."""
        layers = [(past_key_values[2 * i], past_key_values[2 * i + 1]) for i in range(self.num_layers)]
        cache = architectures.make_cache(layers, self.model.config)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True, return_dict=True, **architectures.cache_kwargs(self.model, cache))
        presents = []
        for key, value in architectures.cache_to_tensors(architectures.output_cache(out)):
            presents += [key, value]
        return (out.logits, *presents)


def example_inputs(spec: architectures.ArchSpec, dtype: torch.dtype, batch: int = 2, seq: int = 3, past: int = 4):
    """Tracing inputs; sizes are distinct so the exporter cannot confuse the dynamic axes."""
    H, D = spec.kv_shape
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, spec.vocab_size, (batch, seq), generator=generator)
    attention_mask = torch.ones(batch, past + seq, dtype=torch.int64)
    position_ids = torch.arange(past, past + seq, dtype=torch.int64).unsqueeze(0).expand(batch, -1).contiguous()
    pasts = [torch.randn(batch, H, past, D, generator=generator).to(dtype) for _ in range(2 * spec.num_layers)]
    return input_ids, attention_mask, position_ids, pasts


class CacheContractDecoder(torch.nn.Module):
    """The plain base model with the contract of `contract.py` (the `--layout cache` graph).

    No prefix inside: the runtime feeds the prefix as the first past (B, H_kv, P, D), P ones at the
    start of the mask and positions offset by P, so the presents include the prefix's P positions.
    """

    def __init__(self, model: torch.nn.Module, num_layers: int):
        super().__init__()
        self.model = model
        self.num_layers = num_layers

    def forward(self, input_ids, attention_mask, position_ids, past_key_values: list[torch.Tensor]):
        layers = [(past_key_values[2 * i], past_key_values[2 * i + 1]) for i in range(self.num_layers)]
        cache = architectures.make_cache(layers, self.model.config)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                         return_dict=True, **architectures.cache_kwargs(self.model, cache))
        presents = []
        for key, value in architectures.cache_to_tensors(architectures.output_cache(out)):
            presents += [key, value]  # (B, H_kv, past + seq, D)
        return (out.logits, *presents)


LAYOUTS = ("folded", "cache")


def export_decoder(model: torch.nn.Module, prefix_kv: PrefixKV | None, spec: architectures.ArchSpec, path: Path,
                   opset: int = DEFAULT_OPSET, layout: str = "folded") -> None:
    """Export the decoder of `layout` ("folded": prefix inside; "cache": plain base model) to `path`.

    `prefix_kv=None` with the folded layout exports the base model alone, same contract, no prefix.
    """
    if layout == "folded":
        wrapper = PrefixFoldedDecoder(model, prefix_kv, spec.num_layers).eval()
    elif layout == "cache":
        wrapper = CacheContractDecoder(model, spec.num_layers).eval()
    else:
        raise ValueError(f"layout {layout!r}: expected one of {LAYOUTS}")
    dtype = prefix_kv.tensor.dtype if prefix_kv is not None else next(model.parameters()).dtype
    _export(wrapper, spec, dtype, path, opset)


def export_folded(model: torch.nn.Module, prefix_kv: PrefixKV | None, spec: architectures.ArchSpec, path: Path,
                  opset: int = DEFAULT_OPSET) -> None:
    """Export the folded decoder to `path` (a single file; graph.py post-processes it)."""
    export_decoder(model, prefix_kv, spec, path, opset, "folded")


def _export(wrapper: torch.nn.Module, spec: architectures.ArchSpec, dtype: torch.dtype, path: Path,
            opset: int) -> None:
    from torch.export import Dim

    args = example_inputs(spec, dtype)
    batch, seq = Dim(contract.BATCH), Dim(contract.SEQUENCE)
    past, total = Dim(contract.PAST, min=0), Dim(contract.TOTAL)
    dynamic_shapes = {
        "input_ids": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: total},
        "position_ids": {0: batch, 1: seq},
        "past_key_values": [{0: batch, 2: past}] * (2 * spec.num_layers),
    }
    log.info("torch.onnx.export (dynamo) -> %s", path)
    captured = io.StringIO()
    try:
        with torch.no_grad(), contextlib.redirect_stdout(captured):
            torch.onnx.export(wrapper, args, str(path), dynamo=True, opset_version=opset,
                              input_names=contract.input_names(spec.num_layers),
                              output_names=contract.output_names(spec.num_layers),
                              dynamic_shapes=dynamic_shapes, optimize=True, external_data=True,
                              verbose=False)
    except Exception as exc:  # noqa: BLE001 - the exporter raises many types; one typed error for users
        disk = _os_error_in_chain(exc)
        if disk is not None:
            raise disk from exc  # a write failed (disk full, permissions): the pipeline names it as such
        raise ExportFailedError(f"torch.onnx.export failed for {spec.model_type}: {type(exc).__name__}: {exc}\n"
                                f"exporter output:\n{captured.getvalue()[-2000:]}") from exc
    log.debug("exporter output:\n%s", captured.getvalue())


_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EIO)


def _os_error_in_chain(exc: BaseException) -> OSError | None:
    """The OSError behind an exporter exception (it wraps what its writer raised), if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _WRITE_ERRNOS:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None
