"""Text in, text out with an export folder: tokenizer, session, the generation loop, and input checks.

    runner = ExportRunner("out/", SessionSettings(provider="cuda"))
    result = runner.generate(prompts=["Hello"], config=GenerationConfig(max_new_tokens=20))
    for piece in runner.stream_text("Hello", GenerationConfig()): print(piece, end="")

Token ids in and out when the folder has no tokenizer.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ..errors import InputError
from ..folder import ExportFolder, read_prefix_file
from . import adapters
from .decoder import OnnxSeq2Seq, make_decoder, pad_batch
from .loop import Engine, GenerationConfig, Seq2SeqStepper, Step, generate
from .providers import ALIASES, TENSORRT
from .sessions import SessionSettings, open_session

log = logging.getLogger(__name__)


def parse_token_ids(values: list[str]) -> list[list[int]]:
    try:
        return [[int(t) for t in ids.split(",") if t.strip()] for ids in values]
    except ValueError as exc:
        raise InputError(f"--token-ids must be comma-separated integers ({exc}).") from None


class _TextRunner:
    """What every runner shares: the folder's tokenizer and special tokens, prompt encoding, stop
    tokens, and the result rows. Subclasses set folder, opened, vocab_size and tokenizer."""

    folder: ExportFolder
    opened: object  # sessions.OpenedSession
    tokenizer: object
    vocab_size: int | None

    @property
    def provider(self) -> str:
        return self.opened.provider

    def default_config(self, **overrides) -> GenerationConfig:
        """Stops at the model's eos and pads with its pad (or eos) token unless told otherwise."""
        eos, pad = self.folder.eos_token_id, self.folder.pad_token_id
        values = {"stop_token_ids": (eos,) if eos is not None else (),
                  "pad_token_id": pad if pad is not None else (eos or 0)}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return GenerationConfig(**values)

    def stop_ids(self, values: list) -> list[int]:
        """Stop tokens given as ids (`50256`) or, with a tokenizer, as text that is exactly one token."""
        ids = []
        for value in values:
            if isinstance(value, int) or str(value).strip().lstrip("-").isdigit():
                ids.append(int(value))
                continue
            encoded = self.tokenizer(str(value), add_special_tokens=False)["input_ids"] if self.tokenizer else []
            if len(encoded) != 1:
                raise InputError(f"--stop {value!r}: expected a token id, or text that is exactly one token "
                                 f"(it encodes to {encoded or 'nothing: the folder has no tokenizer'}).")
            ids.append(encoded[0])
        return ids

    # ---- inputs --------------------------------------------------------------------------------

    def encode(self, prompts: list[str] | None = None, token_ids: list[list[int]] | None = None) -> list[list[int]]:
        if prompts and token_ids:
            raise InputError("give --prompt or --token-ids, not both.")
        if prompts:
            if self.tokenizer is None:
                raise InputError(f"{self.folder.path} has no tokenizer files, so text prompts cannot be encoded; pass "
                                 "--token-ids 1,2,3 instead.")
            rows = [self.tokenizer(p)["input_ids"] for p in prompts]
        elif token_ids:
            rows = [list(map(int, r)) for r in token_ids]
        else:
            raise InputError("nothing to generate from: pass --prompt TEXT or --token-ids IDS.")
        if any(len(r) == 0 for r in rows):
            raise InputError("a prompt encodes to zero tokens; give at least one token.")
        outside = sorted({t for r in rows for t in r if t < 0 or (self.vocab_size and t >= self.vocab_size)})
        if outside:
            raise InputError(f"token ids {outside[:8]} are outside the model's vocabulary of {self.vocab_size} "
                             f"tokens; give ids from 0 to {self.vocab_size - 1 if self.vocab_size else 'V - 1'}.")
        return rows

    def _result(self, rows: list[list[int]], new: np.ndarray, config: GenerationConfig) -> dict:
        """Per prompt: its ids, the new ids up to (not including) the first stop token, and the text."""
        stops = set(config.stop_token_ids)
        out_rows = []
        for i, row in enumerate(new.tolist()):
            cut = next((k for k, t in enumerate(row) if t in stops), None)
            stop = row[cut] if cut is not None else None
            row = row[:cut] if cut is not None else row
            text = self.tokenizer.decode(row, skip_special_tokens=True) if self.tokenizer is not None else None
            out_rows.append({"prompt_token_ids": rows[i], "new_token_ids": row, "stop_token_id": stop, "text": text})
        return {"folder": str(self.folder.path), "provider": self.provider, "layout": self.folder.layout,
                "fell_back": self.opened.fell_back, "rows": out_rows}


class ExportRunner(_TextRunner):
    """A decoder-only export folder opened for generation: one session, its tokenizer, its prefix(es)."""

    def __init__(self, folder: str | Path, settings: SessionSettings | None = None, io_binding: bool | None = None,
                 adapter: str | Path | None = None):
        self.folder = ExportFolder.open(folder)
        self.settings = settings or SessionSettings()
        self.opened = open_session(self.folder, self.settings)
        self.tokenizer = self.folder.load_tokenizer()
        prefix = self.folder.read_prefix() if self.folder.layout == "cache" else None
        decoder = make_decoder(self.opened.session, prefix)
        if adapter is not None:  # another task's prefix for this swappable folded graph (adapters.py)
            adapters.activate(decoder, adapter)
        self.engine = Engine(decoder, self.opened.device, self.settings.device_id, io_binding,
                             cuda_graph=self.opened.cuda_graph)
        self.vocab_size = self.engine.decoder.vocab_size or self.folder.vocab_size

    def resolve_prefixes(self, prefixes, batch: int) -> list[np.ndarray] | None:
        """Paths or arrays -> (L, 2, H_kv, P, D) arrays, one for all rows or one per row."""
        if not prefixes:
            return None
        if self.folder.layout != "cache":
            raise InputError(f"{self.folder.path} is a folded export (its prefix is inside the graph); per-row prefixes "
                             "need an export made with --layout cache.")
        if len(prefixes) not in (1, batch):
            raise InputError(f"{len(prefixes)} prefix files for {batch} prompts; give one for all prompts or one "
                             "per prompt, in order.")
        return [p if isinstance(p, np.ndarray) else read_prefix_file(p) for p in prefixes]

    def check_lengths(self, rows: list[list[int]], config: GenerationConfig, prefix_lengths: list[int]) -> None:
        """Position table and TensorRT profile limits, before anything runs."""
        facts = self.folder
        P = prefix_lengths if len(prefix_lengths) == len(rows) else prefix_lengths * len(rows)
        if facts.max_positions is not None:
            needed = max(p + len(r) for p, r in zip(P, rows)) + config.max_new_tokens
            if needed > facts.max_positions:
                longest = max(len(r) for r in rows)
                raise InputError(
                    f"the longest prompt has {longest} tokens; with the prefix's P={max(P)} positions and "
                    f"{config.max_new_tokens} new tokens that needs {needed} positions, but the model has "
                    f"{facts.max_positions}; shorten the prompt (at most "
                    f"{facts.max_positions - max(P) - config.max_new_tokens} tokens) or lower --max-new-tokens.")
        limits = self.opened.limits
        if self.opened.provider == TENSORRT and limits is not None:
            total = (max(P) if facts.layout == "cache" else 0) + max(len(r) for r in rows) + config.max_new_tokens
            if len(rows) > limits.max_batch:
                raise InputError(f"a batch of {len(rows)} prompts is larger than the TensorRT profile's max batch "
                                 f"{limits.max_batch}; pass --max-batch {len(rows)} (rebuilds the engine) or "
                                 "send fewer prompts.")
            if total > limits.max_total_length:
                raise InputError(f"{total} positions (prefix + prompt + new tokens) exceed the TensorRT profile's "
                                 f"max total length {limits.max_total_length}; pass --max-length {total}.")

    def prepare(self, prompts=None, token_ids=None, config: GenerationConfig | None = None, prefixes=None):
        rows = self.encode(prompts, token_ids)
        config = config or self.default_config()
        arrays = self.resolve_prefixes(prefixes, len(rows))
        if self.folder.layout == "cache":
            lengths = [int(a.shape[3]) for a in arrays] if arrays else [int(self.engine.decoder.prefix.shape[3])]
        else:
            lengths = [self.folder.num_virtual_tokens]
        self.check_lengths(rows, config, lengths)
        ids, mask = pad_batch(rows, config.pad_token_id, "left")
        window = self.folder.sliding_window
        if window and len({len(r) for r in rows}) > 1 and max(lengths) + ids.shape[1] + config.max_new_tokens > window:
            # transformers counts cache positions, pads included, in the window: padded rows then see
            # fewer real tokens than they would alone (the graph matches transformers/PEFT on this)
            log.warning("sliding-window model (window %d) with left padding beyond the window: padded rows can "
                        "differ from generating them alone; batch prompts of equal length for identical results",
                        window)
        return rows, ids, mask, config, arrays

    # ---- generation ----------------------------------------------------------------------------

    def stream(self, prompts=None, token_ids=None, config: GenerationConfig | None = None,
               prefixes=None) -> Iterator[Step]:
        _, ids, mask, config, arrays = self.prepare(prompts, token_ids, config, prefixes)
        return self.engine.stream(ids, mask, config, arrays)

    def stream_text(self, prompt: str, config: GenerationConfig | None = None, prefix=None) -> Iterator[str]:
        """Text pieces of one prompt's continuation, as they are generated (stops at a stop token)."""
        config = config or self.default_config()
        stops = set(config.stop_token_ids)
        tokens: list[int] = []
        shown = ""
        for step in self.stream(prompts=[prompt], config=config, prefixes=[prefix] if prefix is not None else None):
            token = int(step.tokens[0])
            if token in stops:
                break
            tokens.append(token)
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            if len(text) > len(shown) and not text.endswith("\ufffd"):  # wait for whole UTF-8 characters
                yield text[len(shown):]
                shown = text

    def generate(self, prompts=None, token_ids=None, config: GenerationConfig | None = None, prefixes=None,
                 on_step: Callable[[Step], None] | None = None) -> dict:
        rows, ids, mask, config, arrays = self.prepare(prompts, token_ids, config, prefixes)
        new = self.engine.generate(ids, mask, config, arrays, on_step=on_step)
        return self._result(rows, new, config)


class Seq2SeqRunner(_TextRunner):
    """An encoder-decoder export folder (encoder_model.onnx + decoder_model.onnx) opened for generation.

    The prompt goes to the encoder (right-padded batch); the decoder starts from the model's
    decoder_start_token_id and runs with its KV cache. The prefix is inside the decoder graph, so
    nothing here knows about it. CPU and CUDA; TensorRT is refused (its profiles are built for the
    decoder-only contract).
    """

    def __init__(self, folder: str | Path, settings: SessionSettings | None = None):
        self.folder = ExportFolder.open(folder)
        self.settings = settings or SessionSettings()
        if ALIASES.get(self.settings.provider.lower(), self.settings.provider) == TENSORRT:
            raise InputError(f"{self.folder.path} is an encoder-decoder export; generate runs it on cpu or cuda, not "
                             "TensorRT.")
        encoder = open_session(self.folder, self.settings, self.folder.encoder_graph)
        self.opened = open_session(self.folder, self.settings)
        self.model = OnnxSeq2Seq(encoder.session, self.opened.session)
        self.tokenizer = self.folder.load_tokenizer()
        self.vocab_size = self.model.vocab_size or self.folder.vocab_size
        if self.folder.decoder_start_token_id is None:
            raise InputError(f"{self.folder.path}/config.json has no decoder_start_token_id; the decoder cannot start.")
        self.decoder_start_token_id = self.folder.decoder_start_token_id

    def generate(self, prompts=None, token_ids=None, config: GenerationConfig | None = None, prefixes=None,
                 on_step: Callable[[Step], None] | None = None) -> dict:
        if prefixes:
            raise InputError(f"{self.folder.path} is an encoder-decoder export with its prefix inside the decoder graph; "
                             "--prefix-kv is for decoder-only exports made with --layout cache.")
        rows = self.encode(prompts, token_ids)
        config = config or self.default_config()
        limit, P = self.folder.max_positions, self.folder.num_virtual_tokens
        if limit is not None:  # learned positions (bart): encoder positions, and decoder positions after P
            if max(len(r) for r in rows) > limit:
                raise InputError(f"the longest prompt has {max(len(r) for r in rows)} tokens; the encoder has "
                                 f"{limit} positions.")
            if P + config.max_new_tokens > limit:  # the start token and all but the last new token are fed
                raise InputError(f"{config.max_new_tokens} new tokens after the prefix's P={P} positions need "
                                 f"{P + config.max_new_tokens} decoder positions, but the model has {limit}; "
                                 f"lower --max-new-tokens to at most {limit - P}.")
        ids, mask = pad_batch(rows, config.pad_token_id, "right")
        new = generate(Seq2SeqStepper(self.model, ids, mask, self.decoder_start_token_id), config, on_step)
        return self._result(rows, new, config)


def open_runner(folder: str | Path, settings: SessionSettings | None = None,
                adapter: str | Path | None = None) -> _TextRunner:
    """The runner that fits the folder: encoder-decoder or decoder-only (with `adapter`'s task)."""
    if ExportFolder.open(folder).is_seq2seq:
        if adapter is not None:
            raise InputError(f"{folder} is an encoder-decoder export; --adapter is for swappable decoder-only exports.")
        return Seq2SeqRunner(folder, settings)
    return ExportRunner(folder, settings, adapter=adapter)


def generate_from_folder(folder: str | Path, prompts: list[str] | None = None, token_ids: list[str] | None = None,
                         max_new_tokens: int = 32, provider: str = "cpu", *, fallback: str | None = None,
                         temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                         stop: list[int] | None = None, prefixes: list | None = None, max_batch: int | None = None,
                         max_length: int | None = None, fp16: bool = False, cuda_graph: bool = False,
                         on_step: Callable[[Step], None] | None = None, adapter: str | Path | None = None) -> dict:
    """The library call behind `prefix-export generate` (token ids as "1,2,3" strings, as on the CLI)."""
    settings = SessionSettings(provider=provider, fallback=fallback, fp16=fp16, max_total_length=max_length,
                               cuda_graph=cuda_graph)
    if max_batch is not None:
        settings.max_batch = max_batch
    runner = open_runner(folder, settings, adapter)
    overrides = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    if stop:
        overrides["stop_token_ids"] = runner.default_config().stop_token_ids + tuple(runner.stop_ids(stop))
    config = runner.default_config(**overrides)
    rows = parse_token_ids(token_ids) if token_ids else None
    return runner.generate(prompts=prompts, token_ids=rows, config=config, prefixes=prefixes, on_step=on_step)
