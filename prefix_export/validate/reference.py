"""The reference: PEFT's own forward over the whole sequence at every step (no cache), never the export.

It shares no code with export/wrappers.py, so a bug in one cannot hide in the other. With
transformers 5.24 and peft 0.21.2, `PeftModel.generate()` was seen to ignore the prefix, so greedy
references run the shared decode loop (runtime/loop.py) on steppers that call `forward`, never
`generate()`.
"""
from __future__ import annotations

import contextlib
import functools

import numpy as np
import torch

from ..runtime.decoder import positions_from_mask
from ..runtime.loop import GenerationConfig, generate
from ..source import architectures


def decoder_forward(peft_model, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray):
    """PEFT forward over the whole sequence: logits (B, S, V) and the user part of the cache.

    Prefix tuning: PEFT prepends its prefix cache, extends the mask by P and shifts the positions we
    give by P. The cache it returns holds P + S positions per layer; the user's part is [P:].
    Prompt tuning and p-tuning: see `virtual_tokens_forward`.
    """
    if prepends_embeddings(peft_model):
        return virtual_tokens_forward(peft_model, input_ids, attention_mask, position_ids)
    P = peft_model.active_peft_config.num_virtual_tokens
    with torch.no_grad():
        out = peft_model(input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(attention_mask),
                         position_ids=torch.from_numpy(position_ids), use_cache=True, return_dict=True)
    presents = []
    for key, value in architectures.cache_to_tensors(architectures.output_cache(out)):
        presents += [_exact_array(key[:, :, P:]), _exact_array(value[:, :, P:])]
    return _exact_array(out.logits), presents


def prepends_embeddings(peft_model) -> bool:
    """Prompt tuning, p-tuning, multitask prompt tuning: PEFT prepends virtual token embeddings to the
    input (prefix tuning prepends keys/values to the cache)."""
    return str(getattr(peft_model.active_peft_config.peft_type, "value", "")) != "PREFIX_TUNING"


def virtual_tokens_forward(peft_model, input_ids: np.ndarray, attention_mask: np.ndarray,
                           position_ids: np.ndarray | None = None):
    """PEFT's forward for a method that prepends P virtual token embeddings: the logits of the user's
    positions (PEFT returns P more, for the virtual ones, dropped here) and the user part of the cache.

    PEFT ignores position ids for these methods: its positions are 0..P+S-1 whatever the mask, so in a
    left-padded batch the padding sits between the virtual tokens and the prompt and moves the prompt's
    positions, and a row's logits depend on its batch's padding (measured on the tiny models with 3 pads:
    up to 0.5 on rotary and learned-position families; none where positions follow the mask, ALiBi and
    OPT). The export gives every row the positions of the contract, the prompt at P + (its positions),
    as for a prefix; so for a padded batch PEFT's forward runs with those positions handed to the base
    model ([0..P-1, P + position_ids]). Unpadded, PEFT's own positions are those already.
    The cache is one that keeps every position, so a sliding-window layer's presents are whole.
    """
    P = peft_model.active_peft_config.num_virtual_tokens
    model = peft_model.get_base_model()
    positions = contextlib.nullcontext()
    if position_ids is not None and not attention_mask.all():
        positions = _base_model_positions(model, P, torch.from_numpy(position_ids))
    with torch.no_grad(), positions:
        out = peft_model(input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(attention_mask),
                         use_cache=True, return_dict=True,
                         **architectures.cache_kwargs(model, architectures.make_cache([])))
    presents = []
    for key, value in architectures.cache_to_tensors(architectures.output_cache(out)):
        presents += [_exact_array(key[:, :, P:]), _exact_array(value[:, :, P:])]
    return _exact_array(out.logits[:, P:]), presents


@contextlib.contextmanager
def _base_model_positions(model: torch.nn.Module, P: int, position_ids: torch.Tensor):
    """Inside, `model`'s forward gets position ids (B, P + S): 0..P-1 for the virtual tokens, then
    P + `position_ids` (B, S) for the user's, in place of the none PEFT passes."""
    full = torch.cat([torch.arange(P).expand(position_ids.shape[0], P), position_ids + P], dim=1)

    def with_positions(module, args, kwargs):
        kwargs["position_ids"] = full
        return args, kwargs

    handle = model.register_forward_pre_hook(with_positions, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def reference_prefix_layers(peft_model) -> list[tuple[np.ndarray, np.ndarray]]:
    """PEFT's own prefix per layer (1, H_kv, P, D), float32, for the check that the export's equals it.

    Prefix tuning: the cache get_prompt builds. Virtual tokens: the cache PEFT's own forward builds for
    no user tokens at all, i.e. over the P virtual tokens alone (its concatenation, mask, dtype cast and
    default positions: a route independent of the export's, with the same shapes, so equal to the bit).
    """
    P = peft_model.active_peft_config.num_virtual_tokens
    if prepends_embeddings(peft_model):
        none = torch.zeros(1, 0, dtype=torch.long)
        model = peft_model.get_base_model()
        with torch.no_grad():
            out = peft_model(input_ids=none, attention_mask=none, use_cache=True, return_dict=True,
                             **architectures.cache_kwargs(model, architectures.make_cache([])))
        layers = architectures.cache_to_tensors(architectures.output_cache(out))
        return [(key.float().numpy(), value.float().numpy()) for key, value in layers]
    with torch.no_grad():
        cache = peft_model.get_prompt(batch_size=1, max_cache_len=P)
    return [(key.float().numpy(), value.float().numpy()) for key, value in architectures.cache_to_tensors(cache)]


def _exact_array(tensor: torch.Tensor) -> np.ndarray:
    """A float64 run's result as float64; any other model dtype's as float32, which holds float16 and
    bfloat16 values exactly at half float64's bytes (the references are kept for the whole validation)."""
    return tensor.numpy() if tensor.dtype == torch.float64 else tensor.float().numpy()


_ROWS = 4096  # output features per float64 slice of a weight


def _linear_float64(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`module(x)` in float64, its weight upcast _ROWS output rows at a time."""
    x = x.double()
    out = x.new_empty(*x.shape[:-1], module.out_features)
    for start in range(0, module.out_features, _ROWS):
        rows = slice(start, start + _ROWS)
        out[..., rows] = x @ module.weight[rows].double().T
        if module.bias is not None:
            out[..., rows] += module.bias[rows].double()
    return out


@contextlib.contextmanager
def in_float64(model: torch.nn.Module):
    """Inside, `model` computes in float64 while holding one module's weights in float64 at a time.

    Each module that owns parameters gets them upcast just before it runs and restored (the very same
    tensors, so nothing is rounded) right after, and floating inputs reaching it are upcast: the
    activations then flow in float64 from the embedding on. `model.double()` would need a float64 copy
    of the whole model (4x an fp16 model's bytes), which a 7B model on a 24 GB machine cannot afford.
    Code that computes in float32 on purpose (RMSNorm's variance, rotary tables) keeps doing so.
    """
    owners = [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]
    # A lookup table gives its rows exactly in any dtype: upcast what it returns, not the whole table
    # (the largest weight of most models, 4x an fp16 table's bytes in float64).
    lookups = [m for m in owners if isinstance(m, torch.nn.Embedding)]
    # A linear layer computes from float64 slices of its weight, never a whole float64 copy (lm_head:
    # vocab x hidden x 8 bytes, 1 GB for a 7B model).
    linears = [m for m in owners if type(m) is torch.nn.Linear]
    owners = [m for m in owners if not isinstance(m, torch.nn.Embedding) and type(m) is not torch.nn.Linear]
    saved: dict[int, dict[str, torch.Tensor]] = {}

    def upcast(value):
        return value.double() if torch.is_tensor(value) and value.is_floating_point() else value

    def before(module, args, kwargs):
        originals = saved.setdefault(id(module), {})
        for name, param in module.named_parameters(recurse=False):
            if param.is_floating_point() and name not in originals:
                originals[name] = param.data
                param.data = param.data.double()
        return tuple(upcast(a) for a in args), {k: upcast(v) for k, v in kwargs.items()}

    def after(module, args, kwargs, output):
        for name, original in saved.pop(id(module), {}).items():
            getattr(module, name).data = original

    handles = [module.register_forward_hook(lambda module, args, output: upcast(output)) for module in lookups]
    for module in linears:
        module.forward = functools.partial(_linear_float64, module)
    for module in owners:
        handles.append(module.register_forward_pre_hook(before, with_kwargs=True))
        handles.append(module.register_forward_hook(after, with_kwargs=True))
    try:
        with torch.no_grad():
            yield model
    finally:
        for module in linears:
            del module.forward  # the class's own forward again
        for handle in handles:
            handle.remove()
        for module in owners:  # a forward that raised midway: put back what it upcast
            after(module, (), {}, None)


def seq2seq_forward(peft_model, input_ids: np.ndarray, attention_mask: np.ndarray, decoder_input_ids: np.ndarray,
                    num_layers: int | None = None, float64: bool = False):
    """PEFT forward over the whole decoder sequence: logits (B, T, V), encoder output (B, S, d),
    the user part of the self-attention cache ([P:]) and the cross-attention cache, numpy float32,
    or, with `float64`, computed in float64 (in_float64) and returned as float64.

    PEFT's self-attention cache has a layer per *encoder* layer; a shallower decoder's cache is its
    first `num_layers`."""
    if float64:
        with in_float64(peft_model):
            return seq2seq_forward(peft_model, input_ids, attention_mask, decoder_input_ids, num_layers)
    P = peft_model.active_peft_config.num_virtual_tokens
    with torch.no_grad():
        out = peft_model(input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(attention_mask),
                         decoder_input_ids=torch.from_numpy(decoder_input_ids), use_cache=True, return_dict=True)
    self_layers, cross_layers = architectures.encoder_decoder_cache_tensors(architectures.output_cache(out))
    self_layers, cross_layers = self_layers[:num_layers], cross_layers[:num_layers]

    def array(tensor: torch.Tensor) -> np.ndarray:  # float64 stays float64, half precision becomes float32
        return tensor.numpy() if tensor.dtype == torch.float64 else tensor.float().numpy()

    presents = []
    for key, value in self_layers:
        presents += [array(key[:, :, P:]), array(value[:, :, P:])]
    for key, value in cross_layers:
        presents += [array(key), array(value)]
    return array(out.logits), array(out.encoder_last_hidden_state), presents


class DecoderReferenceStepper:
    """The decode loop's stepper on PEFT: one unpadded prompt, the whole sequence recomputed each step."""

    def __init__(self, peft_model, prompt: np.ndarray):
        self.peft_model = peft_model
        self.tokens = prompt.astype(np.int64)[None, :]
        self.first_tokens = self.tokens
        self.started = False
        self.logits: list[np.ndarray] = []  # (V,) per step: where a step's choice was nearly a tie

    def step(self, tokens: np.ndarray) -> np.ndarray:
        if self.started:
            self.tokens = np.concatenate([self.tokens, tokens], axis=1)
        self.started = True
        mask = np.ones_like(self.tokens)
        logits, _ = decoder_forward(self.peft_model, self.tokens, mask, positions_from_mask(mask))
        self.logits.append(logits[0, -1].astype(np.float32))
        return logits[:, -1:]


class PeftCachedStepper:
    """The decode loop's stepper on PEFT with a KV cache, as PEFT users run it: PEFT's forward on the
    prompt (it prepends its prefix cache, P ones to the mask, shifts positions by P), then each step on
    the *base* model with the cache that returned (which holds the P prefix positions), mask (B, P + T)
    and positions P + T. Calling PEFT's forward again would overwrite the cache with a fresh prefix.
    bench's eager baseline, and compile's agreement reference (a full recompute per step would cost
    O(T^2) forwards); validation keeps the full recompute (DecoderReferenceStepper)."""

    def __init__(self, peft_model, input_ids: np.ndarray, device="cpu"):
        self.peft_model, self.model = peft_model, peft_model.get_base_model()
        self.P = peft_model.active_peft_config.num_virtual_tokens
        self.device = torch.device(device) if isinstance(device, str) else device
        self.first_tokens = input_ids
        self.cache = None
        self.total = 0

    def step(self, tokens: np.ndarray) -> np.ndarray:
        batch, seq = tokens.shape
        device = self.device
        with torch.inference_mode():
            if self.cache is None:  # the prompt, through PEFT: P + seq positions in the returned cache
                out = self.peft_model(input_ids=torch.from_numpy(tokens).to(device),
                                      attention_mask=torch.ones(batch, seq, dtype=torch.int64, device=device),
                                      position_ids=torch.arange(seq, device=device).expand(batch, -1),
                                      use_cache=True, return_dict=True)
            else:
                out = self.model(input_ids=torch.from_numpy(tokens).to(device),
                                 attention_mask=torch.ones(batch, self.P + self.total + seq, dtype=torch.int64,
                                                           device=device),
                                 position_ids=torch.full((batch, 1), self.P + self.total, dtype=torch.int64,
                                                         device=device),
                                 use_cache=True, return_dict=True, **architectures.cache_kwargs(self.model, self.cache))
        self.cache = architectures.output_cache(out)
        self.total += seq
        return out.logits[:, -1:].float().cpu().numpy()  # .cpu() waits for the device


class Seq2SeqReferenceStepper:
    """Likewise for an encoder-decoder: the encoder and the whole decoder sequence rerun each step."""

    def __init__(self, peft_model, prompt: np.ndarray, decoder_start_token_id: int):
        self.peft_model = peft_model
        self.input_ids = prompt.astype(np.int64)[None, :]
        self.first_tokens = np.array([[decoder_start_token_id]], np.int64)
        self.decoder_ids = np.zeros((1, 0), np.int64)

    def step(self, tokens: np.ndarray) -> np.ndarray:
        self.decoder_ids = np.concatenate([self.decoder_ids, tokens], axis=1)
        logits, _, _ = seq2seq_forward(self.peft_model, self.input_ids, np.ones_like(self.input_ids),
                                       self.decoder_ids)
        return logits[:, -1:]


def reference_greedy(peft_model, prompt: np.ndarray, max_new_tokens: int,
                     decoder_start_token_id: int | None = None, with_logits: bool = False):
    """Greedy tokens (T,) from PEFT's forward; seq2seq when `decoder_start_token_id` is given.
    `with_logits` (decoder only): also each step's logits (T, V), to tell a near-tie from a mismatch."""
    stepper = (DecoderReferenceStepper(peft_model, prompt) if decoder_start_token_id is None
               else Seq2SeqReferenceStepper(peft_model, prompt, decoder_start_token_id))
    tokens = generate(stepper, GenerationConfig.greedy(max_new_tokens))[0]
    return (tokens, np.stack(stepper.logits)) if with_logits else tokens
