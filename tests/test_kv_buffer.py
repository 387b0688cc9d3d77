"""The shared KV buffer (`--kv-buffer shared`, compile/kv_buffer.py, runtime/shared_buffer.py): the
GroupQueryAttention graph validates against PEFT in both layouts for every family whose attention
fuses (ONNX Runtime's CPU kernel runs it), and the fixed-shape decode loop keeps its buffers, shapes
and positions from step to step, as CUDA graphs need."""
from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest

from prefix_export import contract
from prefix_export.api import export_prefix_model
from prefix_export.compile import kv_buffer
from prefix_export.compile.fusions import expected_fusions
from prefix_export.compile.pipeline import CompileOptions
from prefix_export.compile.quantize import QuantizationSettings
from prefix_export.errors import InputError, ValidationError
from prefix_export.folder import ExportFolder
from prefix_export.runtime.decoder import make_decoder, pad_batch
from prefix_export.runtime.generate import ExportRunner
from prefix_export.runtime.loop import GenerationConfig, generate, make_stepper
from prefix_export.runtime.sessions import SessionSettings, create_session, open_session
from prefix_export.runtime.shared_buffer import SharedBufferDecoder
from prefix_export.source import architectures
from tests_helpers import run_cli
from tiny_models import tiny_config

SHARED = CompileOptions(optimize=True, kv_buffer="shared")
DECODER_SPECS = {t: architectures.describe(tiny_config(t)) for t in architectures.supported_model_types()
                 if architectures.describe(tiny_config(t)).family == architectures.FAMILY_DECODER}
FUSED_ATTENTION = [t for t, spec in DECODER_SPECS.items() if "attention" in expected_fusions(spec)[0]]


@pytest.fixture(scope="module")
def shared_exports(tmp_path_factory, family):
    """layout -> (shared-buffer export folder, plain fused export folder) of tiny llama (H=4, H_kv=2)."""
    model, prefix = family("llama")
    root = tmp_path_factory.mktemp("shared")
    made = {}
    for layout in ("folded", "cache"):
        shared = export_prefix_model(str(model), prefix, root / f"shared-{layout}", layout=layout, progress=False,
                                     compile_options=SHARED)
        plain = export_prefix_model(str(model), prefix, root / f"plain-{layout}", layout=layout, progress=False,
                                    compile_options=CompileOptions(optimize=True))
        made[layout] = (shared.folder, plain.folder)
    return made


def test_the_families_with_fused_attention_are_the_registry_s():
    assert {"gpt2", "llama", "mistral", "falcon", "gptj", "phi3", "qwen2", "qwen3"} <= set(FUSED_ATTENTION)


@pytest.mark.parametrize("layout", ["folded", "cache"])
@pytest.mark.parametrize("model_type", FUSED_ATTENTION)
def test_shared_buffer_graph_validates_against_peft(model_type, layout, family, tmp_path):
    model, prefix = family(model_type)
    result = export_prefix_model(str(model), prefix, tmp_path / "out", layout=layout, progress=False,
                                 compile_options=SHARED)
    print(model_type, layout, result.report["compile"]["shared_kv_buffer"])
    print(result.validation.table())
    assert result.validation.passed
    assert result.validation.greedy and all(g["matching"] == g["new_tokens"] for g in result.validation.greedy)
    graph = onnx.load(str(result.graph))
    ops = {n.op_type for n in graph.graph.node}
    spec = architectures.describe(tiny_config(model_type))
    assert sum(n.op_type == "GroupQueryAttention" for n in graph.graph.node) == spec.num_layers
    assert "MultiHeadAttention" not in ops
    inputs = [i.name for i in graph.graph.input]
    assert "attention_mask" not in inputs and inputs[-2:] == [contract.SEQLENS_K, contract.TOTAL_SEQUENCE_LENGTH]
    assert [o.name for o in graph.graph.output][-1] == contract.GREEDY_TOKEN_IDS
    window = [a.i for n in graph.graph.node if n.op_type == "GroupQueryAttention" for a in n.attribute
              if a.name == "local_window_size"]
    assert window == ([spec.sliding_window] * spec.num_layers if spec.sliding_window else [])


@pytest.mark.parametrize("layout", ["folded", "cache"])
def test_fp16_shared_buffer_agrees_with_peft(layout, family, tmp_path):
    model, prefix = family("gpt2")
    options = CompileOptions(optimize=True, kv_buffer="shared", quantization=QuantizationSettings(precision="fp16"))
    result = export_prefix_model(str(model), prefix, tmp_path / "out", layout=layout, progress=False,
                                 compile_options=options)
    peft = result.validation.agreement["against"]["PEFT"]
    print(layout, {k: peft[k] for k in ("top1_agreement", "greedy_equal")})
    assert result.validation.passed and peft["greedy_rate"] >= 0.5
    graph = onnx.load(str(result.graph))
    past = next(i for i in graph.graph.input if i.name == "past_key_values.0.key")
    assert past.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16


def test_a_tampered_shared_buffer_graph_fails_validation(family, tmp_path, monkeypatch):
    """Layer 0's attention scale off by 10%: the export must fail its validation, exit 1, nothing written."""
    original = kv_buffer.share_kv_buffer

    def tampered(model, *args, **kwargs):
        info = original(model, *args, **kwargs)
        node = next(n for n in model.graph.node if n.op_type == "GroupQueryAttention")
        node.attribute.append(onnx.helper.make_attribute("scale", 1.1 / np.sqrt(8)))
        return info

    monkeypatch.setattr(kv_buffer, "share_kv_buffer", tampered)
    model, prefix = family("llama")
    with pytest.raises(ValidationError) as raised:
        export_prefix_model(str(model), prefix, tmp_path / "out", progress=False, compile_options=SHARED)
    print(raised.value)
    assert "logits" in str(raised.value) and raised.value.exit_code == 1
    assert not (tmp_path / "out").exists()


def test_families_without_fused_attention_are_refused(family, tmp_path):
    model, prefix = family("bloom")
    with pytest.raises(InputError, match="ALiBi"):
        export_prefix_model(str(model), prefix, tmp_path / "out", progress=False, compile_options=SHARED)
    assert not (tmp_path / "out").exists()
    with pytest.raises(InputError, match="--optimize"):
        CompileOptions(kv_buffer="shared")



def test_cli_refuses_shared_buffer_without_optimize(family, tmp_path, capsys):
    model, prefix = family("llama")
    code, text = run_cli(["--model", model, "--prefix", prefix, "--out", tmp_path / "out" / "model.onnx",
                          "--kv-buffer", "shared"], capsys)
    assert code == 2 and "--optimize" in text
    assert not (tmp_path / "out").exists()


# ---- the decode loop -----------------------------------------------------------------------------


def _decoder(folder):
    folder = ExportFolder.open(folder)
    prefix = folder.read_prefix() if folder.layout == "cache" else None
    return make_decoder(create_session(folder.graph, "cpu"), prefix)


ROWS = [[5, 9, 23, 7, 41, 3, 17], [12, 8, 30], [44]]


@pytest.mark.parametrize("layout", ["folded", "cache"])
def test_batch_of_different_lengths_gives_the_plain_graph_s_tokens(layout, shared_exports):
    shared, plain = shared_exports[layout]
    ids, mask = pad_batch(ROWS, 0)
    config = GenerationConfig(max_new_tokens=12)
    got = generate(make_stepper(_decoder(shared), ids, mask, 12), config)
    want = generate(make_stepper(_decoder(plain), ids, mask, 12), config)
    print(layout, got.tolist(), want.tolist())
    np.testing.assert_array_equal(got, want)
    for row, tokens in enumerate(ROWS):  # and each row alone
        alone = generate(make_stepper(_decoder(shared), np.array([tokens]), None, 12), config)
        np.testing.assert_array_equal(alone[0], got[row])


@pytest.mark.parametrize("layout", ["folded", "cache"])
def test_decode_steps_keep_buffers_shapes_and_positions(layout, shared_exports):
    """What CUDA graphs need: one binding for every decode step, the same buffer addresses and shapes;
    per row, the step's position and seqlens_k count that row's own tokens (no padding inside)."""
    decoder = _decoder(shared_exports[layout][0])
    assert isinstance(decoder, SharedBufferDecoder)
    ids, mask = pad_batch(ROWS, 0)
    stepper = make_stepper(decoder, ids, mask, 6)
    P = decoder.prefix_length
    assert stepper.capacity == P + 7 + 6
    addresses = [b.data_ptr() for b in stepper.buffers]
    shapes = [tuple(b.shape()) for b in stepper.buffers]
    tokens = stepper.step_greedy(ids)
    np.testing.assert_array_equal(stepper.filled, [P + len(r) for r in ROWS])
    binding = None
    for step in range(5):
        before = stepper.filled.copy()
        tokens = stepper.step_greedy(tokens[:, None])
        assert tokens.shape == (3,)
        binding = binding or stepper.decode_binding
        assert stepper.decode_binding is binding  # made once
        assert [b.data_ptr() for b in stepper.buffers] == addresses and [tuple(b.shape()) for b in
                                                                         stepper.buffers] == shapes
        np.testing.assert_array_equal(stepper.step_seqlens.numpy(), before)  # tokens after this one - 1
        user_positions = before - P  # the folded graph counts user tokens; the cache layout's adds P
        np.testing.assert_array_equal(stepper.step_positions.numpy()[:, 0],
                                      user_positions + (P if layout == "cache" else 0))
        assert int(stepper.step_total) == stepper.capacity  # constant: a captured graph replays it
        np.testing.assert_array_equal(stepper.filled, before + 1)
    if layout == "cache":  # the prefix stays where the runtime put it, in every row
        key = stepper.buffers[0].numpy()
        for row in range(3):
            np.testing.assert_array_equal(key[row, :, :P], decoder.prefix[0, 0])
    tokens = stepper.step_greedy(tokens[:, None])  # the longest row's buffer is full now
    assert stepper.filled.max() == stepper.capacity
    with pytest.raises(InputError, match="holds"):
        stepper.step_greedy(tokens[:, None])


def test_greedy_on_the_device_equals_greedy_from_logits(shared_exports):
    decoder = _decoder(shared_exports["cache"][0])
    ids, mask = pad_batch(ROWS, 0)
    by_ids = generate(make_stepper(decoder, ids, mask, 10), GenerationConfig(max_new_tokens=10))

    class LogitsOnly:  # the same stepper without its argmax: the loop samples from the logits
        def __init__(self, stepper):
            self.stepper, self.first_tokens = stepper, stepper.first_tokens

        def step(self, tokens):
            return self.stepper.step(tokens)

    by_logits = generate(LogitsOnly(make_stepper(decoder, ids, mask, 10)), GenerationConfig(max_new_tokens=10))
    np.testing.assert_array_equal(by_ids, by_logits)


def test_cuda_graph_run_ids_leave_cpu_results_alone(shared_exports):
    """The capture bookkeeping (prompts as gpu_graph_id -1, decode steps as 1) runs on the CPU provider
    too, which ignores it: the tokens do not change."""
    decoder = _decoder(shared_exports["folded"][0])
    ids, mask = pad_batch(ROWS, 0)
    config = GenerationConfig(max_new_tokens=8)
    captured = make_stepper(decoder, ids, mask, 8, cuda_graph=True)
    np.testing.assert_array_equal(generate(captured, config), generate(make_stepper(decoder, ids, mask, 8), config))
    assert captured.capture


def test_cuda_graph_where_impossible_falls_back_with_a_log_line(shared_exports, caplog):
    shared, plain = shared_exports["cache"]
    with caplog.at_level(logging.WARNING):
        opened = open_session(ExportFolder.open(shared), SessionSettings(provider="cpu", cuda_graph=True))
    assert not opened.cuda_graph and "only the CUDA provider" in caplog.text
    runner = ExportRunner(shared, SessionSettings(provider="cpu", cuda_graph=True))
    plain_runner = ExportRunner(plain)
    ids = np.array([ROWS[0]])
    np.testing.assert_array_equal(runner.engine.generate(ids, config=GenerationConfig(max_new_tokens=8)),
                                  plain_runner.engine.generate(ids, config=GenerationConfig(max_new_tokens=8)))


def test_generate_cli_on_a_shared_buffer_export(shared_exports, capsys):
    shared, plain = shared_exports["folded"]
    args = ["--token-ids", "5,9,23,7", "--token-ids", "12,8", "--max-new-tokens", "8", "--json"]
    code, got = run_cli(["generate", shared, *args], capsys)
    assert code == 0, got
    code, want = run_cli(["generate", plain, *args], capsys)
    import json

    rows = [r["new_token_ids"] for r in json.loads(got[got.index("{"):])["rows"]]
    assert rows == [r["new_token_ids"] for r in json.loads(want[want.index("{"):])["rows"]]


@pytest.mark.parametrize("layout", ["folded", "cache"])
def test_later_generations_reuse_the_buffers_a_graph_was_captured_on(layout, shared_exports):
    """A captured CUDA graph replays the addresses it was captured with: a second generation of the same
    batch size and buffer length runs on the same buffers, and its tokens do not depend on what the
    first one left there (a longer prompt first, then a shorter one)."""
    decoder = _decoder(shared_exports[layout][0])
    config = GenerationConfig(max_new_tokens=8)
    first = make_stepper(decoder, np.array([ROWS[0]]), None, 8, cuda_graph=True)
    assert first.capacity % 256 == 0 and first.capacity >= decoder.prefix_length + len(ROWS[0]) + 8
    generate(first, config)
    second = make_stepper(decoder, np.array([ROWS[1]]), None, 8, cuda_graph=True)
    assert second.state is first.state and [b.data_ptr() for b in second.buffers] == [b.data_ptr() for b in
                                                                                     first.buffers]
    reused = generate(second, config)
    fresh = generate(make_stepper(_decoder(shared_exports[layout][0]), np.array([ROWS[1]]), None, 8), config)
    np.testing.assert_array_equal(reused, fresh)
    other_batch = make_stepper(decoder, np.array([ROWS[1], ROWS[1]]), None, 8, cuda_graph=True)
    assert other_batch.state is not first.state and other_batch.state.graph_id != first.state.graph_id


@pytest.mark.parametrize("layout", ["folded", "cache"])
def test_validate_rechecks_a_shared_buffer_folder(layout, shared_exports):
    from prefix_export.api import validate_export

    result = validate_export(shared_exports[layout][0])
    print(result.table())
    assert result.passed


def test_a_failed_capture_falls_back_to_uncaptured_steps_with_a_log_line(shared_exports, caplog):
    """ONNX Runtime refusing to capture (here: a session that raises for any captured run id) costs the
    capture, not the generation: one warning, the step rerun uncaptured, the same tokens."""
    decoder = _decoder(shared_exports["cache"][0])
    session = decoder.session

    class RefusesCapture:
        def __getattr__(self, name):
            return getattr(session, name)

        def run_with_iobinding(self, binding, run_options=None):
            if run_options is not None and run_options.get_run_config_entry("gpu_graph_id") != "-1":
                raise RuntimeError("graph capture is not supported here")
            return session.run_with_iobinding(binding, run_options)

    ids = np.array([ROWS[0]])
    want = generate(make_stepper(decoder, ids, None, 8), GenerationConfig(max_new_tokens=8))
    decoder.session = RefusesCapture()
    stepper = make_stepper(decoder, ids, None, 8, cuda_graph=True)
    with caplog.at_level(logging.WARNING):
        got = generate(stepper, GenerationConfig(max_new_tokens=8))
    np.testing.assert_array_equal(got, want)
    assert not stepper.capture and caplog.text.count("capture failed") == 1


def test_the_base_model_runs_on_the_cache_layout_graph_without_a_prefix(shared_exports):
    """bench's base rows: the cache-layout shared graph with no prefix is the base model; its `run` with a
    past (validation's contract) gives the plain cache-layout graph's logits run without a prefix."""
    shared, plain = shared_exports["cache"]
    base = make_decoder(create_session(ExportFolder.open(shared).graph, "cpu"))
    reference = make_decoder(create_session(ExportFolder.open(plain).graph, "cpu"))
    assert isinstance(base, SharedBufferDecoder) and base.prefix_length == 0
    ids, mask = pad_batch(ROWS, 0)
    positions = np.clip(np.cumsum(mask, 1) - 1, 0, None)
    got, got_past = base.run(ids, mask, positions, base.empty_past(3))
    want, want_past = reference.run(ids, mask, positions, reference.empty_past(3))
    np.testing.assert_allclose(got[mask.astype(bool)], want[mask.astype(bool)], atol=1e-5)
    step_mask = np.concatenate([mask, np.ones((3, 1), np.int64)], axis=1)
    step_ids, step_positions = np.array([[3], [4], [5]]), positions[:, -1:] + 1
    got, _ = base.run(step_ids, step_mask, step_positions, got_past)
    want, _ = reference.run(step_ids, step_mask, step_positions, want_past)
    np.testing.assert_allclose(got, want, atol=1e-5)
