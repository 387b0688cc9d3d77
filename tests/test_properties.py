"""Property tests: random small configurations export and validate, or fail with a typed error.

Hypothesis draws the model (layers, heads, KV heads where the architecture has them, head dim,
position table size), the prefix (P, projection on/off) and the validation feeds (batch size,
prompt lengths, hence left padding). The export either validates, also on the drawn feeds, or, when
P does not fit the position table, fails with MismatchError; anything else fails the test.
Few examples (each is a full export); derandomized so CI runs the same ones every time.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from prefix_export.source import architectures  # noqa: E402
from prefix_export.api import export_prefix_model  # noqa: E402
from prefix_export.errors import MismatchError, PrefixExportError  # noqa: E402
from tiny_models import make_prefix, save_tiny_model  # noqa: E402

VOCAB = 64
# llama (grouped-query attention: KV heads < heads) joins once it is in the registry (issue 3).
MODEL_TYPES = [t for t in ("gpt2", "llama") if t in architectures.supported_model_types()]


@st.composite
def configurations(draw):
    model_type = draw(st.sampled_from(MODEL_TYPES))
    layers = draw(st.integers(1, 3))
    heads = draw(st.sampled_from([1, 2, 4]))
    head_dim = draw(st.sampled_from([4, 8, 16]))
    kv_heads = draw(st.sampled_from([h for h in (1, 2, 4) if heads % h == 0])) if model_type == "llama" else heads
    positions = draw(st.sampled_from([8, 12, 64]))
    P = draw(st.integers(1, 8))
    projection = draw(st.booleans())
    lengths = tuple(draw(st.lists(st.integers(1, 10), min_size=1, max_size=3)))
    return dict(model_type=model_type, layers=layers, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                positions=positions, P=P, projection=projection, lengths=lengths)


def _config(c):
    from transformers import AutoConfig

    hidden = c["heads"] * c["head_dim"]
    if c["model_type"] == "gpt2":
        return AutoConfig.for_model("gpt2", n_layer=c["layers"], n_head=c["heads"], n_embd=hidden, vocab_size=VOCAB,
                                    n_positions=c["positions"], bos_token_id=1, eos_token_id=2)
    return AutoConfig.for_model("llama", hidden_size=hidden, intermediate_size=2 * hidden,
                                num_hidden_layers=c["layers"], num_attention_heads=c["heads"],
                                num_key_value_heads=c["kv_heads"], vocab_size=VOCAB,
                                max_position_embeddings=c["positions"], bos_token_id=1, eos_token_id=2)


@settings(max_examples=5, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(configurations())
@example(dict(model_type="gpt2", layers=1, heads=2, kv_heads=2, head_dim=4, positions=8, P=8, projection=True,
              lengths=(3,)))  # P fills the whole position table: must be refused
def test_random_configuration_exports_and_validates_or_fails_typed(c):
    from prefix_export.source.base_model import load_base_model
    from prefix_export.source.checkpoint import load_prefix_checkpoint
    from prefix_export.source.prefix_kv import build_peft_model
    from prefix_export.runtime.decoder import OnnxDecoder
    from prefix_export.runtime.sessions import create_session
    from prefix_export.validate.decoder import validate

    print(c)
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        save_tiny_model(_config(c), work / "model")
        prefix = make_prefix(work / "model", work / "prefix", c["P"], projection=c["projection"], trained=False)
        learned = c["model_type"] == "gpt2"
        try:
            result = export_prefix_model(str(work / "model"), prefix, work / "out", progress=False)
        except PrefixExportError as exc:
            # The only input here that may be refused: a prefix longer than the position table.
            assert isinstance(exc, MismatchError) and learned and c["P"] >= c["positions"], \
                f"{type(exc).__name__} for {c}: {exc}"
            assert not (work / "out").exists()
            return
        assert not (learned and c["P"] >= c["positions"]), f"P={c['P']} >= {c['positions']} positions was exported"
        assert result.validation.passed, result.validation.table()
        # Again on the drawn feeds: batch len(lengths), left padding wherever lengths differ.
        base = load_base_model(str(work / "model"))
        peft_model = build_peft_model(base, load_prefix_checkpoint(prefix))
        budget = c["positions"] - c["P"] if learned else None
        report = validate(OnnxDecoder(create_session(result.graph)), peft_model, VOCAB, prompt_lengths=c["lengths"],
                          decode_steps=3, greedy_tokens=4, greedy_prompts=1, seed=len(c["lengths"]),
                          max_positions=budget)
        assert report.passed, report.table()
