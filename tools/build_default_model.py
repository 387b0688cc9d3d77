#!/usr/bin/env python
"""Build the small embedded default model + prefix used by the Quickstart.

Everything is produced locally (no hub access needed) and deterministically:

1. A synthetic E2E-style table-to-text task, e.g.

       name: Aromi | food: Chinese | area: city centre =>
       -> " Aromi serves Chinese food in the city centre."

   with a disjoint held-out test split.
2. A byte-level BPE tokenizer trained with ``tokenizers`` on that text and
   wrapped in ``transformers.PreTrainedTokenizerFast``.
3. A tiny GPT-2 base model, trained as a plain LM on target sentences alone and
   on tables alone (never on table -> sentence pairs), so it knows the language
   but not the task.
4. A PEFT prefix (``PrefixTuningConfig``, projection on) trained on the frozen
   base model with the format ``<table> =><target><eos>`` (loss on the target).
5. Greedy evaluation (own loop over ``forward``; ``PeftModel.generate`` is not
   used because with transformers 5.x + peft 0.21 it was seen to ignore the
   prefix) of base vs prefix-tuned on the held-out split.

Output layout (``--out``, default ``models/default``)::

    base/            save_pretrained model (safetensors) + tokenizer + generation_config.json
    prefix/          peft_model.save_pretrained (adapter_config.json + adapter_model.safetensors)
    prefix_encoder/  prefix_encoder.safetensors (raw PrefixEncoder state dict) + prefix_config.json
    README.md        description, sizes, example outputs
    examples.json    held-out prompts, greedy outputs and metrics

The output directory is replaced atomically (built in a temporary sibling and
renamed), so the script can be rerun safely.

Usage::

    HF_HUB_OFFLINE=1 python tools/build_default_model.py --out models/default
"""

from __future__ import annotations

import argparse
import enum
import json
import logging
import math
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

# Single-threaded and offline *before* importing torch / tokenizers.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

log = logging.getLogger("build_default_model")

# --------------------------------------------------------------------------
# Task definition
# --------------------------------------------------------------------------

NAMES = [
    "Aromi", "Zizzi", "Cotto", "Giraffe", "Strada", "Clowns", "Cocum", "Wildwood",
    "Alimentum", "Fitzbillies", "The Eagle", "The Mill", "The Punter", "The Phoenix",
    "Green Man", "Loch Fyne", "Blue Spice", "Bibimbap House", "Taste of Cambridge",
    "Midsummer House",
]
FOODS = ["Chinese", "English", "French", "Indian", "Italian", "Japanese", "Thai", "Mexican"]
AREAS = ["city centre", "riverside"]
PRICES = ["cheap", "affordable", "expensive"]
RATINGS = ["1 out of 5", "3 out of 5", "5 out of 5"]

FIELD_VALUES = {"name": NAMES, "food": FOODS, "area": AREAS, "price": PRICES, "rating": RATINGS}
FIELD_ORDER = ["name", "food", "price", "area", "rating"]

# One deterministic template per field set, so exact match is well defined.
TEMPLATES: dict[tuple[str, ...], str] = {
    ("name", "food"): " {name} serves {food} food.",
    ("name", "food", "area"): " {name} serves {food} food in the {area}.",
    ("name", "food", "price"): " {name} serves {food} food and is {price}.",
    ("name", "area", "rating"): " {name} is in the {area} and is rated {rating}.",
    ("name", "food", "price", "area"): " {name} serves {food} food in the {area} and is {price}.",
    ("name", "food", "area", "rating"): " {name} serves {food} food in the {area} and is rated {rating}.",
}

# The Quickstart's default prompt; always placed in the held-out split.
DEMO_RECORD = {"name": "Aromi", "food": "Chinese", "area": "city centre"}

SEPARATOR = " =>"  # prompt = table + SEPARATOR; target starts with a space
EOS_TOKEN = "<|endoftext|>"


def format_table(record: dict[str, str]) -> str:
    return " | ".join(f"{k}: {record[k]}" for k in FIELD_ORDER if k in record)


def format_prompt(record: dict[str, str]) -> str:
    return format_table(record) + SEPARATOR


def format_target(record: dict[str, str]) -> str:
    key = tuple(k for k in FIELD_ORDER if k in record)
    return TEMPLATES[key].format(**record)


def all_records() -> list[dict[str, str]]:
    """Enumerate every possible record (deterministic order)."""
    out: list[dict[str, str]] = []
    for fields in TEMPLATES:
        combos: list[dict[str, str]] = [{}]
        for f in fields:
            combos = [dict(c, **{f: v}) for c in combos for v in FIELD_VALUES[f]]
        out.extend(combos)
    return out


def make_splits(seed: int, n_train: int, n_test: int) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    records = [r for r in all_records() if r != DEMO_RECORD]
    rng.shuffle(records)
    if n_train + n_test > len(records) + 1:
        raise ValueError(f"only {len(records) + 1} distinct records, asked for {n_train}+{n_test}")
    test = [dict(DEMO_RECORD)] + records[: n_test - 1]
    train = records[n_test - 1 : n_test - 1 + n_train]
    return train, test


def _random_full_record(rng: random.Random) -> dict[str, str]:
    return {f: rng.choice(FIELD_VALUES[f]) for f in FIELD_ORDER}


def _project(record: dict[str, str], fields) -> dict[str, str]:
    return {f: record[f] for f in fields}


def build_lm_corpus(train: list[dict], rng: random.Random, n_docs: int) -> list[str]:
    """Plain-LM documents for the base model.

    * single target sentences of the training records,
    * single tables of the training records,
    * two-sentence descriptions of one (random) restaurant using two different
      templates, e.g. " Aromi serves Chinese food. Aromi is in the riverside and
      has a low rating." -- this teaches in-context copying of names/values,
    * two tables (different field subsets) of one random restaurant joined by
      " ; " -- copying values by field name.

    A table is never followed by a sentence, so the table->text task itself is
    not learned by the base model.
    """
    docs = [format_target(r) for r in train] + [format_table(r) for r in train]
    keys = list(TEMPLATES)
    while len(docs) < n_docs:
        full = _random_full_record(rng)
        k1, k2 = rng.sample(keys, 2)
        if rng.random() < 0.5:
            docs.append(format_target(_project(full, k1)) + format_target(_project(full, k2)))
        else:
            docs.append(format_table(_project(full, k1)) + " ; " + format_table(_project(full, k2)))
    rng.shuffle(docs)
    return docs


# --------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------


def build_tokenizer(corpus: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        model_max_length=128,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    return hf_tok


def encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


# --------------------------------------------------------------------------
# Training helpers
# --------------------------------------------------------------------------


class Deadline:
    """Safety cap on training, in *CPU* seconds of this process (robust to a busy machine)."""

    def __init__(self, seconds: float):
        self.start = time.process_time()
        self.seconds = seconds

    def expired(self) -> bool:
        return self.seconds > 0 and time.process_time() - self.start > self.seconds


def collate(seqs: list[list[int]], label_starts: list[int], pad_id: int):
    """Right-pad; labels are -100 on padding and before label_start."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    for i, (s, ls) in enumerate(zip(seqs, label_starts)):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
        labels[i, ls : len(s)] = torch.tensor(s[ls:])
    return ids, mask, labels


def train_loop(model, params, examples, *, steps, batch_size, lr, pad_id, seed, deadline, what):
    """examples: list of (token_ids, label_start)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        frac = (step - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    model.train()
    t0 = time.monotonic()
    ema = None
    done = 0
    for step in range(steps):
        if deadline.expired():
            log.warning("%s: time budget exhausted after %d/%d steps (result now depends on machine speed)",
                        what, step, steps)
            break
        idx = torch.randint(len(examples), (batch_size,), generator=gen).tolist()
        seqs = [examples[i][0] for i in idx]
        starts = [examples[i][1] for i in idx]
        ids, mask, labels = collate(seqs, starts, pad_id)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        loss = out.loss.item()
        ema = loss if ema is None else 0.95 * ema + 0.05 * loss
        done = step + 1
        if step % 200 == 0 or step == steps - 1:
            log.info("%s step %4d/%d loss %.4f (ema %.4f) %.1fs", what, step, steps, loss, ema,
                     time.monotonic() - t0)
    model.eval()
    return {"steps": done, "final_loss_ema": round(ema, 4) if ema is not None else None,
            "seconds": round(time.monotonic() - t0, 1)}


@torch.no_grad()
def greedy(model, prompt_ids: list[list[int]], eos_id: int, max_new_tokens: int) -> list[list[int]]:
    """Batched greedy decoding for equal-length prompts.

    Recomputes the full sequence each step (no KV cache) and passes an
    all-ones attention mask, so it works identically for the plain model and
    for a prefix-tuned PeftModel (whose forward injects the prefix).
    """
    ids = torch.tensor(prompt_ids, dtype=torch.long)
    n = ids.shape[0]
    finished = torch.zeros(n, dtype=torch.bool)
    new: list[list[int]] = [[] for _ in range(n)]
    for _ in range(max_new_tokens):
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -1, :]
        nxt = logits.argmax(dim=-1)
        for i in range(n):
            if not finished[i]:
                if nxt[i].item() == eos_id:
                    finished[i] = True
                else:
                    new[i].append(nxt[i].item())
        if bool(finished.all()):
            break
        ids = torch.cat([ids, nxt[:, None]], dim=1)
    return new


def generate_texts(model, tok, prompts: list[str], max_new_tokens: int) -> list[str]:
    enc = [encode(tok, p) for p in prompts]
    by_len: dict[int, list[int]] = {}
    for i, e in enumerate(enc):
        by_len.setdefault(len(e), []).append(i)
    out: list[str | None] = [None] * len(prompts)
    for _, idxs in sorted(by_len.items()):
        gen = greedy(model, [enc[i] for i in idxs], tok.eos_token_id, max_new_tokens)
        for i, g in zip(idxs, gen):
            out[i] = tok.decode(g, skip_special_tokens=True)
    return out  # type: ignore[return-value]


def slot_recall(record: dict[str, str], text: str) -> float:
    vals = list(record.values())
    return sum(1 for v in vals if v in text) / len(vals)


def evaluate(model, tok, records, max_new_tokens):
    prompts = [format_prompt(r) for r in records]
    refs = [format_target(r) for r in records]
    hyps = generate_texts(model, tok, prompts, max_new_tokens)
    em = sum(h == r for h, r in zip(hyps, refs)) / len(refs)
    sr = sum(slot_recall(rec, h) for rec, h in zip(records, hyps)) / len(refs)
    return {"exact_match": round(em, 4), "slot_recall": round(sr, 4), "n": len(refs)}, hyps


# --------------------------------------------------------------------------
# Saving helpers
# --------------------------------------------------------------------------


def _jsonable(obj):
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, set):
        return sorted(_jsonable(v) for v in obj)
    return obj


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def file_listing(root: Path) -> list[tuple[str, int]]:
    return [(p.relative_to(root).as_posix(), p.stat().st_size) for p in sorted(root.rglob("*")) if p.is_file()]


def atomic_replace(tmp: Path, out: Path) -> None:
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.rename(out, old)
    os.rename(tmp, out)
    if old is not None:
        shutil.rmtree(old)


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("models/default"), help="output directory (replaced)")
    p.add_argument("--base-ref", default=None,
                   help="base_model_name_or_path written into the adapter config (default: <out>/base as given)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-test", type=int, default=120)
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--n-positions", type=int, default=128)
    p.add_argument("--n-lm-docs", type=int, default=12000, help="base-LM corpus size (documents)")
    p.add_argument("--base-steps", type=int, default=1200)
    p.add_argument("--base-lr", type=float, default=3e-3)
    p.add_argument("--prefix-steps", type=int, default=1500)
    p.add_argument("--prefix-lr", type=float, default=5e-3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-virtual-tokens", type=int, default=10)
    p.add_argument("--encoder-hidden-size", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--seconds", type=float, default=900.0,
                   help="safety cap on total training CPU time in seconds (0 = none); normal runs stay far below "
                        "it; if it is hit, training stops early and the output depends on machine speed")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "peft", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    t_start = time.monotonic()
    cpu_start = time.process_time()
    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    torch.use_deterministic_algorithms(True)
    random.seed(args.seed)
    torch.manual_seed(args.seed)

    import transformers
    import peft
    from peft import PrefixTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM, GenerationConfig, GPT2Config

    transformers.logging.set_verbosity_error()

    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp creates 0700
    try:
        # ---------------- data
        train, test = make_splits(args.seed, args.n_train, args.n_test)
        train_set = {format_table(r) for r in train}
        assert not any(format_table(r) in train_set for r in test), "test leaks into train"
        log.info("data: %d distinct records, %d train, %d test, %d templates",
                 len(all_records()), len(train), len(test), len(TEMPLATES))

        # ---------------- tokenizer
        corpus = [format_prompt(r) + format_target(r) for r in train]
        corpus += [format_table(r) for r in test] + [format_target(r) for r in test]  # vocabulary only
        tok = build_tokenizer(corpus, args.vocab_size)
        eos_id = tok.eos_token_id
        for r in train + test:  # round trip
            for text in (format_prompt(r), format_target(r), format_prompt(r) + format_target(r)):
                assert tok.decode(encode(tok, text)) == text, text
        lens = [len(encode(tok, format_prompt(r) + format_target(r))) + 1 for r in train + test]
        log.info("tokenizer: vocab %d, eos/bos/pad id %d, seq len min/mean/max %d/%.1f/%d",
                 len(tok), eos_id, min(lens), sum(lens) / len(lens), max(lens))
        assert max(lens) + args.num_virtual_tokens <= args.n_positions

        # ---------------- base model
        cfg = GPT2Config(
            vocab_size=len(tok),
            n_positions=args.n_positions,
            n_embd=args.n_embd,
            n_layer=args.n_layer,
            n_head=args.n_head,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=tok.bos_token_id,
            eos_token_id=eos_id,
            pad_token_id=tok.pad_token_id,
            tie_word_embeddings=True,
        )
        torch.manual_seed(args.seed)
        model = AutoModelForCausalLM.from_config(cfg)
        n_params = sum(p.numel() for p in model.parameters())
        log.info("base model: GPT-2 %d layers, %d heads, d=%d, %d params", args.n_layer, args.n_head,
                 args.n_embd, n_params)

        deadline = Deadline(args.seconds)
        # LM data: never a table followed by its sentence (so the base does not know the task).
        lm_texts = build_lm_corpus(train, random.Random(args.seed + 10), args.n_lm_docs)
        lm_examples = [([eos_id] + encode(tok, t) + [eos_id], 1) for t in lm_texts]
        log.info("base LM corpus: %d documents, e.g. %r", len(lm_examples), lm_texts[2])
        base_stats = train_loop(model, list(model.parameters()), lm_examples, steps=args.base_steps,
                                batch_size=args.batch_size, lr=args.base_lr, pad_id=tok.pad_token_id,
                                seed=args.seed + 1, deadline=deadline, what="base-LM")

        # ---------------- prefix tuning on the frozen base
        for p in model.parameters():
            p.requires_grad_(False)
        pcfg = PrefixTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=args.num_virtual_tokens,
            prefix_projection=True,
            encoder_hidden_size=args.encoder_hidden_size,
        )
        torch.manual_seed(args.seed + 2)
        pmodel = get_peft_model(model, pcfg)
        trainable = [p for p in pmodel.parameters() if p.requires_grad]
        n_prefix = sum(p.numel() for p in trainable)
        log.info("prefix: %d virtual tokens, encoder hidden %d, %d trainable params",
                 args.num_virtual_tokens, args.encoder_hidden_size, n_prefix)
        task_examples = []
        for r in train:
            p_ids = encode(tok, format_prompt(r))
            t_ids = encode(tok, format_target(r))
            task_examples.append((p_ids + t_ids + [eos_id], len(p_ids)))
        prefix_stats = train_loop(pmodel, trainable, task_examples, steps=args.prefix_steps,
                                  batch_size=args.batch_size, lr=args.prefix_lr, pad_id=tok.pad_token_id,
                                  seed=args.seed + 3, deadline=deadline, what="prefix")

        # ---------------- evaluation (own greedy loop; prefix applied via forward)
        base_model = pmodel.get_base_model()
        with pmodel.disable_adapter():
            base_metrics, base_hyps = evaluate(pmodel, tok, test, args.max_new_tokens)
        prefix_metrics, prefix_hyps = evaluate(pmodel, tok, test, args.max_new_tokens)
        # sanity: disable_adapter path == plain base model
        check_b = generate_texts(base_model, tok, [format_prompt(test[0])], args.max_new_tokens)[0]
        assert check_b == base_hyps[0], (check_b, base_hyps[0])
        train_probe = train[:120]
        train_metrics, _ = evaluate(pmodel, tok, train_probe, args.max_new_tokens)
        log.info("held-out (%d): base EM %.3f slot-recall %.3f | prefix EM %.3f slot-recall %.3f",
                 len(test), base_metrics["exact_match"], base_metrics["slot_recall"],
                 prefix_metrics["exact_match"], prefix_metrics["slot_recall"])
        log.info("train probe (%d): prefix EM %.3f", len(train_probe), train_metrics["exact_match"])

        # ---------------- save
        base_dir, prefix_dir, enc_dir = tmp / "base", tmp / "prefix", tmp / "prefix_encoder"
        base_model.generation_config = GenerationConfig(
            bos_token_id=tok.bos_token_id, eos_token_id=eos_id, pad_token_id=tok.pad_token_id,
            do_sample=False, max_new_tokens=args.max_new_tokens,
        )
        base_model.save_pretrained(base_dir, safe_serialization=True)
        tok.save_pretrained(base_dir)
        # transformers 5 writes tokenizer_class "TokenizersBackend", which 4.x cannot resolve;
        # "PreTrainedTokenizerFast" loads the same tokenizer.json in both.
        tc_path = base_dir / "tokenizer_config.json"
        tc = json.loads(tc_path.read_text())
        tc["tokenizer_class"] = "PreTrainedTokenizerFast"
        tc_path.write_text(json.dumps(tc, indent=2, sort_keys=True) + "\n")

        base_ref = args.base_ref if args.base_ref is not None else out.joinpath("base").as_posix()
        pmodel.peft_config["default"].base_model_name_or_path = base_ref
        # save_embedding_layers=False: the base path does not exist yet (temp dir), and with "auto"
        # peft may then decide to copy wte/lm_head into the adapter.
        pmodel.save_pretrained(prefix_dir, safe_serialization=True, save_embedding_layers=False)
        (prefix_dir / "README.md").unlink(missing_ok=True)  # peft's boilerplate model card
        adapter_keys = sorted(load_file(str(prefix_dir / "adapter_model.safetensors")))
        assert adapter_keys == ["prompt_embeddings"], adapter_keys
        enc_dir.mkdir()
        enc_state = {k: v.detach().contiguous().clone()
                     for k, v in pmodel.prompt_encoder["default"].state_dict().items()}
        save_file(enc_state, str(enc_dir / "prefix_encoder.safetensors"), metadata={"format": "pt"})
        pc = _jsonable(pmodel.peft_config["default"].to_dict())
        pc["inference_mode"] = False
        (enc_dir / "prefix_config.json").write_text(json.dumps(pc, indent=2, sort_keys=True) + "\n")

        # ---------------- reload checks (from the temp dir)
        from peft import PeftModel
        reloaded_base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
        reloaded = PeftModel.from_pretrained(reloaded_base, prefix_dir).eval()
        rl_hyps = generate_texts(reloaded, tok, [format_prompt(r) for r in test[:8]], args.max_new_tokens)
        assert rl_hyps == prefix_hyps[:8], ("reloaded adapter differs", rl_hyps, prefix_hyps[:8])
        from transformers import AutoTokenizer
        tok2 = AutoTokenizer.from_pretrained(base_dir)
        assert encode(tok2, format_prompt(test[0])) == encode(tok, format_prompt(test[0]))

        # ---------------- examples.json + README
        demo = dict(DEMO_RECORD)
        if format_table(demo) in train_set:
            log.warning("demo prompt is in the training split")
        demo_prompt = format_prompt(demo)
        with pmodel.disable_adapter():
            demo_base = generate_texts(pmodel, tok, [demo_prompt], args.max_new_tokens)[0]
        demo_prefix = generate_texts(pmodel, tok, [demo_prompt], args.max_new_tokens)[0]
        demo_in_test = any(format_table(r) == format_table(demo) for r in test)

        n_show = 12
        examples = {
            "prompt_format": "<table>" + SEPARATOR + "   where <table> = 'field: value | field: value ...' "
                             "in field order " + ", ".join(FIELD_ORDER),
            "separator": SEPARATOR,
            "eos_token": EOS_TOKEN,
            "decoding": "greedy over forward (full recompute, attention_mask of ones), stop at eos, "
                        f"max_new_tokens={args.max_new_tokens}",
            "default_prompt": demo_prompt,
            "default_prompt_base_output": demo_base,
            "default_prompt_prefix_output": demo_prefix,
            "default_prompt_expected": format_target(demo),
            "default_prompt_split": "test" if demo_in_test else "unseen",
            "metrics": {
                "test_base": base_metrics,
                "test_prefix": prefix_metrics,
                "train_probe_prefix": train_metrics,
                "definition": "exact_match: greedy output == reference target string; "
                              "slot_recall: fraction of table values appearing verbatim in the output",
            },
            "examples": [
                {"prompt": format_prompt(r), "reference": format_target(r),
                 "base_output": b, "prefix_output": h}
                for r, b, h in list(zip(test, base_hyps, prefix_hyps))[:n_show]
            ],
        }
        (tmp / "examples.json").write_text(json.dumps(examples, indent=2, ensure_ascii=False) + "\n")

        # test split (all held-out records) for downstream checks
        (tmp / "test_split.jsonl").write_text(
            "".join(json.dumps({"prompt": format_prompt(r), "target": format_target(r)}) + "\n" for r in test))

        elapsed = time.monotonic() - t_start
        sizes_before_readme = file_listing(tmp)
        readme = render_readme(
            args=args, tok=tok, n_params=n_params, n_prefix=n_prefix, base_stats=base_stats,
            prefix_stats=prefix_stats, base_metrics=base_metrics, prefix_metrics=prefix_metrics,
            train_metrics=train_metrics, demo_prompt=demo_prompt, demo_base=demo_base,
            demo_prefix=demo_prefix, demo_ref=format_target(demo), elapsed=elapsed,
            files=sizes_before_readme, n_train=len(train), n_test=len(test), base_ref=base_ref,
            cpu=time.process_time() - cpu_start,
            versions={"torch": torch.__version__, "transformers": transformers.__version__,
                      "peft": peft.__version__},
        )
        (tmp / "README.md").write_text(readme)

        total = dir_size(tmp)
        atomic_replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    elapsed = time.monotonic() - t_start
    print("\n=== build_default_model summary ===")
    print(f"output          : {out}  ({total / 1e6:.2f} MB)")
    for rel, size in file_listing(out):
        print(f"  {rel:45s} {size:>9d} B")
    print(f"base model      : GPT-2 {args.n_layer}L/{args.n_head}H/d{args.n_embd}, vocab {len(tok)}, {n_params} params")
    print(f"prefix          : {args.num_virtual_tokens} virtual tokens, projection on "
          f"(hidden {args.encoder_hidden_size}), {n_prefix} params")
    print(f"held-out EM     : base {base_metrics['exact_match']:.3f}  prefix {prefix_metrics['exact_match']:.3f}"
          f"  (n={base_metrics['n']})")
    print(f"held-out slots  : base {base_metrics['slot_recall']:.3f}  prefix {prefix_metrics['slot_recall']:.3f}")
    print(f"prompt format   : 'name: X | food: Y | area: Z =>'  (fields in order {', '.join(FIELD_ORDER)})")
    print(f"default prompt  : {demo_prompt!r}")
    print(f"  base   -> {demo_base!r}")
    print(f"  prefix -> {demo_prefix!r}")
    print(f"run time        : {elapsed:.1f}s wall, {time.process_time() - cpu_start:.1f}s CPU (threads={args.threads})")
    return 0


def render_readme(*, args, tok, n_params, n_prefix, base_stats, prefix_stats, base_metrics, prefix_metrics,
                  train_metrics, demo_prompt, demo_base, demo_prefix, demo_ref, elapsed, files, n_train,
                  n_test, base_ref, versions, cpu) -> str:
    tmpl_lines = "\n".join(f"| {', '.join(k)} | `{v}` |" for k, v in TEMPLATES.items())
    file_lines = "\n".join(f"| `{rel}` | {size:,} |" for rel, size in files)
    return f"""# Default model: tiny GPT-2 + prefix for E2E-style table-to-text

Generated by `tools/build_default_model.py` (seed {args.seed}); do not edit by hand.
Rebuild with:

```bash
HF_HUB_OFFLINE=1 python tools/build_default_model.py --out {args.out.as_posix()}
```

## Task

A synthetic table-to-text task in the spirit of E2E (Li & Liang, 2021, prefix-tuning).
A table (a restaurant's attributes) is written as `field: value` pairs separated by ` | `,
fields always in the order {", ".join(FIELD_ORDER)}, followed by the separator `{SEPARATOR.strip()}`.
The model continues with one sentence (starting with a space) and then `{EOS_TOKEN}`.

Prompt format: `name: <name> | food: <food> | area: <area> =>` (any of the field sets below)

| fields | target template |
|---|---|
{tmpl_lines}

Values: {len(NAMES)} names, foods {", ".join(FOODS)}; areas {", ".join(AREAS)};
price {", ".join(PRICES)}; rating {", ".join(RATINGS)}.
{n_train} training records and a disjoint held-out split of {n_test} records (`test_split.jsonl`).

## Example (greedy, default prompt)

```
prompt : {demo_prompt}
base   : {demo_base!r}
prefix : {demo_prefix!r}
target : {demo_ref!r}
```

## Held-out metrics (n={base_metrics["n"]}, greedy)

| model | exact match | slot recall |
|---|---|---|
| base (no prefix) | {base_metrics["exact_match"]:.3f} | {base_metrics["slot_recall"]:.3f} |
| base + prefix | {prefix_metrics["exact_match"]:.3f} | {prefix_metrics["slot_recall"]:.3f} |

(prefix exact match on {train_metrics["n"]} training records: {train_metrics["exact_match"]:.3f})

Slot recall = fraction of the table's values that appear verbatim in the output.
More examples are in `examples.json`.

## Using it (PyTorch reference)

The prompt is plain text, encoded without any added special token (no bos). Decode greedily
until `{EOS_TOKEN}`:

```python
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import PeftModel

tok = AutoTokenizer.from_pretrained("{args.out.as_posix()}/base")
model = PeftModel.from_pretrained(
    AutoModelForCausalLM.from_pretrained("{args.out.as_posix()}/base"), "{args.out.as_posix()}/prefix"
).eval()
ids = tok("{demo_prompt}", return_tensors="pt").input_ids
with torch.no_grad():
    for _ in range({args.max_new_tokens}):  # full recompute, no cache: PeftModel.generate() ignores the prefix
        nxt = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1].argmax()
        if nxt.item() == tok.eos_token_id:
            break
        ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
print(tok.decode(ids[0]))
```

## Contents

| path | bytes |
|---|---|
{file_lines}
| `README.md` | (this file) |

- `base/`: `GPT2LMHeadModel` ({args.n_layer} layers, {args.n_head} heads, d_model {args.n_embd},
  n_positions {args.n_positions}, {n_params:,} parameters, tied embeddings, dropout 0) saved with
  `save_pretrained` (safetensors), plus the tokenizer (byte-level BPE trained with `tokenizers`,
  vocab {len(tok)}, `{EOS_TOKEN}` = bos = eos = pad = unk, id {tok.eos_token_id}; no special tokens are
  added automatically) and `generation_config.json`.
- `prefix/`: PEFT adapter (`PrefixTuningConfig`, task `CAUSAL_LM`, {args.num_virtual_tokens} virtual
  tokens, `prefix_projection=True`, `encoder_hidden_size={args.encoder_hidden_size}`) saved with
  `PeftModel.save_pretrained`. As PEFT does for prefix tuning, `adapter_model.safetensors` holds the
  *projected* past key/values (`prompt_embeddings`, shape
  `[{args.num_virtual_tokens}, {args.n_layer}*2*{args.n_embd}]`) and the config has
  `inference_mode: true`. `base_model_name_or_path` = `{base_ref}`.
- `prefix_encoder/`: the raw trainable `PrefixEncoder` state dict ({n_prefix:,} parameters:
  `embedding.weight` and the `transform.*` MLP) as `prefix_encoder.safetensors`, and the full
  `PrefixTuningConfig.to_dict()` as `prefix_config.json` (with `inference_mode: false`).

## How it was built

1. Tokenizer trained on the training text (plus held-out text for vocabulary coverage only).
2. Base model initialised with `AutoModelForCausalLM.from_config` under `torch.manual_seed({args.seed})` and
   trained {base_stats["steps"]} steps (batch {args.batch_size}, AdamW lr {args.base_lr}) as a plain LM on
   {args.n_lm_docs} documents: target sentences alone, tables alone, two-sentence descriptions of one
   restaurant (e.g. `" Aromi serves Chinese food. Aromi is in the riverside and is rated 5 out of 5."`)
   and two tables of one restaurant joined by ` ; ` -- the last two give it generic in-context copying,
   which a frozen model needs for prefix-tuning to work. It never sees a table followed by a sentence
   (nor the `=>` separator), so it does not know the task. Final loss (EMA) {base_stats["final_loss_ema"]}.
3. Base frozen; prefix trained {prefix_stats["steps"]} steps (AdamW lr {args.prefix_lr}) on
   `<table> =><target><eos>` with loss on the target only. Final loss (EMA) {prefix_stats["final_loss_ema"]}.
4. Evaluation uses a hand-written greedy loop over `forward` (full recompute each step,
   attention mask of ones), not `generate()`: with transformers 5.x + peft 0.21,
   `PeftModel.generate()` was seen to ignore the prefix. Note that in PeftModel's forward the real
   tokens get position ids starting at `num_virtual_tokens` ({args.num_virtual_tokens}), because
   GPT-2 derives positions from the prefix cache length.

Single-threaded CPU build, {cpu:.0f} s of CPU time. Versions: torch {versions["torch"]},
transformers {versions["transformers"]}, peft {versions["peft"]}.
"""


if __name__ == "__main__":
    sys.exit(main())
