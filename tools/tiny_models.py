"""Factories for tiny models and prefixes, shared by the tests (and by tools/ checks)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

# One tiny config per registered architecture; test_architectures fails when one is missing.
# Each covers a feature: GQA/MQA (llama, mistral, qwen3, gemma2, falcon), rotary (gptj, gpt_neox, llama...),
# ALiBi (bloom), learned positions (gpt2, gpt_neo, opt), sliding windows smaller than the test
# sequences (mistral, gemma2, gpt_neo local layers), untied embeddings (llama, opt's default is tied).
_COMMON = dict(vocab_size=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)
_LLAMA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=256, **_COMMON)
TINY_CONFIGS = {
    "gpt2": dict(n_layer=2, n_head=4, n_embd=32, n_positions=128, **_COMMON),
    "gpt_neo": dict(num_layers=2, num_heads=4, hidden_size=32, max_position_embeddings=128, window_size=8,
                    attention_types=[[["global", "local"], 1]], **_COMMON),
    "gptj": dict(n_layer=2, n_head=4, n_embd=32, rotary_dim=4, n_positions=128, **_COMMON),
    "gpt_neox": dict(num_hidden_layers=2, num_attention_heads=4, hidden_size=32, intermediate_size=64,
                     max_position_embeddings=128, rotary_pct=0.5, **_COMMON),
    "opt": dict(num_hidden_layers=2, num_attention_heads=4, hidden_size=32, ffn_dim=64, word_embed_proj_dim=32,
                max_position_embeddings=128, **_COMMON),
    "bloom": dict(n_layer=2, n_head=4, hidden_size=32, **_COMMON),
    # falcon-40b style (new decoder architecture, 2 KV groups); multi-query falcon-7b style is refused
    # because PEFT itself cannot prefix-tune it (see test_architectures).
    "falcon": dict(num_hidden_layers=2, num_attention_heads=4, hidden_size=32, new_decoder_architecture=True,
                   num_kv_heads=2, alibi=False, **_COMMON),
    "llama": dict(num_key_value_heads=2, tie_word_embeddings=False, **_LLAMA),
    "mistral": dict(num_key_value_heads=2, sliding_window=8, **_LLAMA),
    "qwen2": dict(num_key_value_heads=4, tie_word_embeddings=True, **_LLAMA),
    "qwen3": dict(num_key_value_heads=1, head_dim=16, **_LLAMA),
    "phi3": dict(num_key_value_heads=2, **_LLAMA),
    "gemma": dict(num_key_value_heads=1, head_dim=8, **_LLAMA),
    "gemma2": dict(num_key_value_heads=2, head_dim=8, sliding_window=8, query_pre_attn_scalar=8, **_LLAMA),
    # Encoder-decoder (PEFT SEQ_2_SEQ_LM), parity test in test_seq2seq.py. BART: learned positions in a
    # small table (64 rows, so the decoder's P offset and token budget matter), tied embeddings and
    # final_logits_bias, a decoder shallower than the encoder (distilbart style: PEFT sizes the
    # prefix by the encoder's depth). T5: relative position bias with few buckets and a short max distance (so
    # the prefix's P offset moves tokens between buckets), untied, gated-GELU (v1.1 style).
    "bart": dict(d_model=32, encoder_layers=3, decoder_layers=2, encoder_attention_heads=4,
                 decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                 decoder_start_token_id=2, forced_eos_token_id=None, **_COMMON),
    "t5": dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
               relative_attention_num_buckets=8, relative_attention_max_distance=16, feed_forward_proj="gated-gelu",
               tie_word_embeddings=False, decoder_start_token_id=0, **_COMMON),
}


def tiny_config(model_type: str, **overrides):
    from transformers import AutoConfig

    kwargs = dict(TINY_CONFIGS[model_type])
    kwargs.update(overrides)
    return AutoConfig.for_model(model_type, **kwargs)


def _model_class(config):
    """AutoModelForCausalLM, or AutoModelForSeq2SeqLM for the registry's seq2seq families."""
    from prefix_export.source.architectures import describe
    from prefix_export.source.base_model import auto_model_class

    return auto_model_class(describe(config))


def save_tiny_model(config, folder: Path, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = _model_class(config).from_config(config).eval()
    with torch.no_grad():
        # Norm weights start as exact ones and zeros, so two norms reading one input (a parallel
        # block's) would be the same computation and graph optimizers merge them; trained models'
        # norms differ, and so do these.
        for name, module in model.named_modules():
            if "norm" in type(module).__name__.lower():
                for param in module.parameters(recurse=False):
                    param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(folder)
    return model


def make_prefix(model_dir: Path, out: Path, num_virtual_tokens: int, projection: bool, trained: bool,
                kind: str = "peft_adapter", seed: int = 0, steps: int = 8) -> Path:
    """A prefix for the model in `model_dir`, trained a few steps (or random), saved as `kind`.

    kind "peft_adapter": PeftModel.save_pretrained(out) (adapter_config.json + adapter_model.safetensors).
    kind "raw_safetensors" / "raw_pt": the PrefixEncoder's own state dict (projection MLP included)
    as out/prefix_encoder.{safetensors,pt} + out/prefix_config.json. Returns the path to pass as --prefix.
    """
    from peft import PrefixTuningConfig, get_peft_model
    from transformers import AutoConfig

    from prefix_export.source.architectures import describe

    torch.manual_seed(seed)
    model_config = AutoConfig.from_pretrained(model_dir)
    model = _model_class(model_config).from_pretrained(model_dir)
    config = PrefixTuningConfig(task_type=describe(model_config).task_type, num_virtual_tokens=num_virtual_tokens,
                                prefix_projection=projection, encoder_hidden_size=24)
    peft_model = get_peft_model(model, config)
    encoder = peft_model.prompt_encoder["default"]
    with torch.no_grad():  # PEFT initialises near zero; make the prefix matter from step 0
        for param in encoder.parameters():
            param.normal_(0.0, 0.5)
    if trained:
        _train(peft_model, list(encoder.parameters()), model.config.vocab_size, steps, seed)
    peft_model.eval()
    out.mkdir(parents=True, exist_ok=True)
    if kind == "peft_adapter":
        peft_model.save_pretrained(out)
        return out
    state = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
    config_dict = peft_model.peft_config["default"].to_dict()
    config_dict["inference_mode"] = False
    (out / "prefix_config.json").write_text(json.dumps(_jsonable(config_dict), indent=2))
    if kind == "raw_safetensors":
        from safetensors.torch import save_file

        save_file(state, str(out / "prefix_encoder.safetensors"))
        return out / "prefix_encoder.safetensors"
    if kind == "raw_pt":
        torch.save(state, out / "prefix_encoder.pt")
        return out / "prefix_encoder.pt"
    raise ValueError(kind)


def _train(peft_model, params: list, vocab: int, steps: int, seed: int, num_tasks: int = 0) -> None:
    """A few Adam steps (lr 1e-2) of `params` on random (4, 12) batches; multitask: random task ids."""
    optimizer = torch.optim.Adam(params, lr=1e-2)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        batch = torch.randint(0, vocab, (4, 12), generator=generator)
        extra = {"task_ids": torch.randint(0, num_tasks, (4,), generator=generator)} if num_tasks else {}
        loss = peft_model(input_ids=batch, attention_mask=torch.ones_like(batch), labels=batch, **extra).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    if dataclasses.is_dataclass(value):
        return _jsonable(dataclasses.asdict(value))
    if hasattr(value, "value"):  # enums
        return value.value
    return value


# ---- virtual-token methods (prompt tuning, p-tuning, multitask prompt tuning) -----------------------


TEXT_INIT = "w5 w17 w42 w9 w64 w3 w77 w11"  # words of save_word_tokenizer's vocabulary


def save_word_tokenizer(folder: Path, vocab_size: int = 128) -> Path:
    """A word-level tokenizer whose words "w0".."w{vocab_size-1}" are token ids 0..vocab_size-1, for
    prompt_tuning_init TEXT (which PEFT reads at training time only) on the tiny models."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="w0").save_pretrained(folder)
    return folder


def make_virtual_tokens(model_dir: Path, out: Path, method: str = "prompt_tuning", num_virtual_tokens: int = 6,
                        init: str = "RANDOM", encoder: str = "MLP", kind: str = "peft_adapter", trained: bool = True,
                        seed: int = 0, steps: int = 6, tokenizer_dir: Path | None = None, num_tasks: int = 3) -> Path:
    """A PEFT prompt-tuning, p-tuning or multitask prompt-tuning adapter for the model in `model_dir`,
    trained a few steps (or as initialised), saved as `kind`; returns the path to pass as --prefix.

    method "prompt_tuning": `init` RANDOM, SAMPLE_VOCAB or TEXT (TEXT reads `tokenizer_dir`, a
    save_word_tokenizer folder, at creation only). "p_tuning": a PromptEncoder with an `encoder` MLP or
    LSTM head. "multitask_prompt_tuning": `num_tasks` tasks, factors drawn large enough to differ.
    kind "peft_adapter": PeftModel.save_pretrained(out) (PEFT saves the encoder's output); kind
    "raw_safetensors" (p-tuning): the PromptEncoder's own state dict, MLP/LSTM included, as
    out/prompt_encoder.safetensors + out/prefix_config.json.
    """
    from peft import MultitaskPromptTuningConfig, PromptEncoderConfig, PromptTuningConfig, get_peft_model
    from transformers import AutoConfig

    from prefix_export.source.architectures import describe

    torch.manual_seed(seed)
    model_config = AutoConfig.from_pretrained(model_dir)
    model = _model_class(model_config).from_pretrained(model_dir)
    common = dict(task_type=describe(model_config).task_type, num_virtual_tokens=num_virtual_tokens)
    if method == "prompt_tuning":
        text = {}
        if init == "TEXT":  # PEFT tokenizes the text once, here; the adapter keeps only the embeddings
            text = dict(prompt_tuning_init_text=TEXT_INIT, tokenizer_name_or_path=str(tokenizer_dir))
        config = PromptTuningConfig(prompt_tuning_init=init, **text, **common)
    elif method == "p_tuning":
        config = PromptEncoderConfig(encoder_reparameterization_type=encoder, encoder_hidden_size=24, **common)
    elif method == "multitask_prompt_tuning":
        config = MultitaskPromptTuningConfig(num_tasks=num_tasks, num_ranks=2, **common)
    else:
        raise ValueError(method)
    peft_model = get_peft_model(model, config)
    encoder_module = peft_model.prompt_encoder["default"]
    with torch.no_grad():
        if method == "multitask_prompt_tuning":  # PEFT's 0.02-scale factors would make every task near zero
            encoder_module.prefix_task_cols.normal_(0.0, 1.0)
            encoder_module.prefix_task_rows.normal_(0.0, 1.0)
    if trained:
        _train(peft_model, [p for p in encoder_module.parameters() if p.requires_grad], model.config.vocab_size,
               steps, seed, num_tasks if method == "multitask_prompt_tuning" else 0)
    peft_model.eval()
    out.mkdir(parents=True, exist_ok=True)
    if kind == "peft_adapter":
        peft_model.save_pretrained(out)
        return out
    if kind != "raw_safetensors" or method != "p_tuning":
        raise ValueError(f"{kind} for {method}")
    from safetensors.torch import save_file

    config_dict = peft_model.peft_config["default"].to_dict()
    config_dict["inference_mode"] = False
    (out / "prefix_config.json").write_text(json.dumps(_jsonable(config_dict), indent=2))
    save_file({k: v.detach().clone().contiguous() for k, v in encoder_module.state_dict().items()},
              str(out / "prompt_encoder.safetensors"))
    return out / "prompt_encoder.safetensors"
