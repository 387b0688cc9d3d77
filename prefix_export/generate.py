"""Text in, text out with an export folder: tokenizer + the contract's generation loop."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from . import contract
from .errors import InputError
from .runtime import OnnxDecoder, create_session, graph_path, greedy_generate

log = logging.getLogger(__name__)


def _folder_facts(folder: Path) -> dict:
    """eos/pad ids and the user-token budget, from the folder's config files and graph metadata."""
    from .graph import read_metadata

    facts = {"eos_token_id": None, "pad_token_id": None, "max_user_tokens": None}
    for name in ("generation_config.json", "config.json"):
        path = folder / name
        if path.is_file():
            data = json.loads(path.read_text())
            for key in ("eos_token_id", "pad_token_id"):
                if facts[key] is None and data.get(key) is not None:
                    value = data[key]
                    facts[key] = value[0] if isinstance(value, list) else value
            if facts["max_user_tokens"] is None and data.get("n_positions"):
                facts["max_positions"] = data["n_positions"]
    metadata = read_metadata(graph_path(folder))
    P = int(metadata.get(contract.META_PREFIX_LENGTH, 0))
    if facts.get("max_positions"):
        facts["max_user_tokens"] = facts["max_positions"] - P
    facts["num_virtual_tokens"] = P
    return facts


def load_tokenizer(folder: Path):
    if not any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def left_pad(rows: list[list[int]], pad_token_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(B, S_max) ids and mask, padded on the left so every row's last token is at the end."""
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_token_id, np.int64)
    mask = np.zeros((len(rows), width), np.int64)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = row
        mask[i, width - len(row):] = 1
    return ids, mask


def generate_from_folder(folder: str | Path, prompts: list[str] | None = None, token_ids: list[str] | None = None,
                         max_new_tokens: int = 32, provider: str = "cpu") -> dict:
    folder = Path(folder)
    graph = graph_path(folder)
    facts = _folder_facts(folder)
    tokenizer = load_tokenizer(folder)
    if prompts and token_ids:
        raise InputError("give --prompt or --token-ids, not both.")
    if prompts:
        if tokenizer is None:
            raise InputError(f"{folder} has no tokenizer files, so text prompts cannot be encoded; pass "
                             "--token-ids 1,2,3 instead.")
        rows = [tokenizer(p)["input_ids"] for p in prompts]
    elif token_ids:
        try:
            rows = [[int(t) for t in ids.split(",") if t.strip()] for ids in token_ids]
        except ValueError as exc:
            raise InputError(f"--token-ids must be comma-separated integers ({exc}).") from None
    else:
        raise InputError("nothing to generate from: pass --prompt TEXT or --token-ids IDS.")
    if any(len(r) == 0 for r in rows):
        raise InputError("a prompt encodes to zero tokens; give at least one token.")
    budget = facts["max_user_tokens"]
    longest = max(len(r) for r in rows)
    if budget is not None and longest + max_new_tokens > budget:
        raise InputError(f"the longest prompt has {longest} tokens and {max_new_tokens} new tokens are asked for, "
                         f"but the model takes {budget} tokens after its P={facts['num_virtual_tokens']} prefix "
                         "positions; shorten the prompt or lower --max-new-tokens.")
    pad = facts["pad_token_id"] if facts["pad_token_id"] is not None else (facts["eos_token_id"] or 0)
    ids, mask = left_pad(rows, pad)
    decoder = OnnxDecoder(create_session(graph, provider))
    new = greedy_generate(decoder, ids, mask, max_new_tokens, facts["eos_token_id"])
    out_rows = []
    for i, row in enumerate(new.tolist()):
        if facts["eos_token_id"] is not None and facts["eos_token_id"] in row:
            row = row[: row.index(facts["eos_token_id"])]
        text = tokenizer.decode(row, skip_special_tokens=True) if tokenizer is not None else None
        out_rows.append({"prompt_token_ids": rows[i], "new_token_ids": row, "text": text})
    return {"folder": str(folder), "provider": provider, "rows": out_rows}
