"""Provider options (TensorRT profiles, CUDA), the session factory's fallback, and runtime bad input.

CUDA and TensorRT cannot run here; their options are plain data built from the graph, inspected here.
"""
from __future__ import annotations

import json
from pathlib import Path
import logging

import pytest

from tests_helpers import run_cli

from prefix_export import contract
from prefix_export.runtime import providers
from prefix_export.errors import InputError, RuntimeSetupError
from prefix_export.folder import ExportFolder
from prefix_export.runtime.sessions import SessionSettings, build_provider_options, open_session


@pytest.fixture
def exported(exports):
    """The lively tiny GPT-2 (H_kv 4, D 8, 128 positions) + a P=4 adapter, in both layouts (conftest)."""
    return exports


def parse_profile(text: str) -> dict[str, list[int]]:
    shapes = {}
    for item in text.split(","):
        name, _, dims = item.rpartition(":")
        shapes[name] = [int(d) for d in dims.split("x")]
    return shapes


@pytest.mark.parametrize("layout", ["folded", "cache"])
def test_tensorrt_profiles_cover_every_dynamic_input(exported, layout):
    folder = exported[layout]
    facts = ExportFolder.open(folder)
    settings = SessionSettings(provider="tensorrt", max_batch=6, max_total_length=100, fp16=True)
    options, limits = build_provider_options(facts, providers.TENSORRT, settings)
    inputs = providers.graph_inputs(facts.graph)
    dynamic = {name for name, dims in inputs.items() if not all(isinstance(d, int) for d in dims)}
    assert dynamic == set(contract.input_names(2))  # every contract input has a dynamic axis
    profiles = {k: parse_profile(options[f"trt_profile_{k}_shapes"]) for k in ("min", "opt", "max")}
    for which in profiles.values():
        assert set(which) == dynamic
    P = 4 if layout == "cache" else 0
    for which, profile in profiles.items():
        for name in dynamic:
            assert len(profile[name]) == len(inputs[name])
            assert all(a <= b <= c for a, b, c in zip(profiles["min"][name], profiles["opt"][name],
                                                      profiles["max"][name])), name
        # the contract's arithmetic holds inside each profile: total = past + sequence, one batch
        batch, seq = profile["input_ids"]
        past = profile["past_key_values.0.key"][2]
        if which != "max":
            assert profile["attention_mask"] == [batch, past + seq], which
        assert profile["position_ids"] == [batch, seq]
        assert all(profile[n][0] == batch for n in dynamic)
        assert profile["past_key_values.1.value"][1:] == [4, past, 8]  # static H_kv, D kept
    assert profiles["max"]["input_ids"][0] == 6 and profiles["min"]["input_ids"][0] == 1
    assert profiles["max"]["attention_mask"][1] == 100
    assert profiles["min"]["past_key_values.0.key"][2] == P  # the cache layout never has a zero-length past
    assert profiles["max"]["past_key_values.0.key"][2] == 99
    assert profiles["max"]["input_ids"][1] == 100 - P
    # max is a box: the longest past with one new token, or the longest prompt on the first past
    assert profiles["max"]["attention_mask"][1] == 99 + 1 == (100 - P) + P
    # caches inside the export folder, precision switch, profile-specific engine names
    assert options["trt_engine_cache_path"] == str(folder / "trt_cache" / "engines")
    assert options["trt_timing_cache_path"] == str(folder / "trt_cache" / "timing")
    assert options["trt_fp16_enable"] == "True" and options["trt_engine_cache_enable"] == "True"
    assert options["trt_engine_cache_prefix"] == "b6_t100_fp16"
    assert (limits.max_batch, limits.max_total_length, limits.min_past) == (6, 100, P)


def test_tensorrt_length_defaults_to_position_table(exported):
    facts = ExportFolder.open(exported["cache"])
    options, limits = build_provider_options(facts, providers.TENSORRT, SessionSettings(provider="trt"))
    assert limits.max_total_length == 128  # tiny GPT-2's n_positions
    assert options["trt_fp16_enable"] == "False" and limits.max_batch == 8


def test_profile_rejects_unknown_dynamic_axis():
    from prefix_export.errors import UnsupportedError

    with pytest.raises(UnsupportedError, match="'beam'.*contract's named axes"):
        providers.profile_shapes({"input_ids": ["beam", 3]}, providers.ShapeLimits(2, 10))
    with pytest.raises(InputError, match="leaves no room"):
        providers.ShapeLimits(2, 4, min_past=4)


def test_cuda_options_and_chain():
    options = providers.cuda_options(device_id=1)
    assert options["device_id"] == "1" and options["use_tf32"] == "0"
    assert options["arena_extend_strategy"] == "kSameAsRequested"
    assert providers.cuda_options(tf32=True)["use_tf32"] == "1"
    chain = providers.provider_chain(providers.TENSORRT, {"device_id": "0"})
    assert [name for name, _ in chain] == [providers.TENSORRT, providers.CUDA, providers.CPU]
    assert providers.provider_chain(providers.CPU) == [(providers.CPU, {})]
    assert providers.device_of(providers.TENSORRT) == "cuda" and providers.device_of(providers.CPU) == "cpu"


def test_partial_provider_names():
    available = [providers.CPU, providers.CUDA, providers.TENSORRT]
    assert providers.resolve_provider("trt", available) == providers.TENSORRT
    assert providers.resolve_provider("Tensorrt", available) == providers.TENSORRT
    assert providers.resolve_provider("cu", available) == providers.CUDA
    with pytest.raises(RuntimeSetupError, match="'rocm'.*Installed: CPUExecutionProvider"):
        providers.resolve_provider("rocm", [providers.CPU])


def test_missing_provider_is_an_error_unless_fallback_asked(exported, caplog):
    if "CUDAExecutionProvider" in providers.available_providers():
        pytest.skip("CUDA is installed here")
    with pytest.raises(RuntimeSetupError, match="'cuda'.*not available.*Installed: .*--fallback cpu"):
        open_session(exported["folded"], SessionSettings(provider="cuda"))
    with caplog.at_level(logging.WARNING, logger="prefix_export"):
        opened = open_session(exported["folded"], SessionSettings(provider="cuda", fallback="cpu"))
    assert opened.provider == providers.CPU and opened.fell_back and opened.requested == "cuda"
    assert any("falling back to the CPU" in r.message for r in caplog.records)


# ---- bad input through the CLI: exit 2 and a message -------------------------------------------


def test_generate_on_a_folder_that_is_not_an_export(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    code, text = run_cli(["generate", str(tmp_path), "--token-ids", "1,2"], capsys)
    assert code == 2 and "not an export folder" in text


def test_generate_on_a_foreign_onnx(tmp_path, capsys):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph), str(tmp_path / "model.onnx"))
    code, text = run_cli(["generate", str(tmp_path), "--token-ids", "1,2"], capsys)
    assert code == 2 and "not written by prefix-export" in text


def test_generate_with_a_provider_not_installed(exported, capsys):
    code, text = run_cli(["generate", str(exported["folded"]), "--token-ids", "1,2", "--provider", "rocm"], capsys)
    assert code == 2 and "'rocm'" in text and "Installed:" in text


@pytest.mark.parametrize("layout", ["folded", "cache"])
def test_generate_prompt_longer_than_context(exported, capsys, layout):
    # n_positions 128, P 4: 120 prompt tokens + 8 new tokens need 132 positions
    ids = ",".join(["5"] * 120)
    code, text = run_cli(["generate", str(exported[layout]), "--token-ids", ids, "--max-new-tokens", "8"], capsys)
    assert code == 2 and "needs 132 positions" in text and "has 128" in text and "at most 116" in text
    code, _ = run_cli(["generate", str(exported[layout]), "--token-ids", ids, "--max-new-tokens", "4"], capsys)
    assert code == 0


def test_batch_larger_than_tensorrt_profile(exported):
    from prefix_export.runtime.loop import GenerationConfig
    from prefix_export.runtime.generate import ExportRunner

    runner = ExportRunner(exported["cache"])
    # what a TensorRT session would carry; the check runs before any session work
    runner.opened.provider = providers.TENSORRT
    runner.opened.limits = providers.ShapeLimits(max_batch=2, max_total_length=30, min_past=4)
    with pytest.raises(InputError, match="batch of 3 prompts is larger than the TensorRT profile's max batch 2"):
        runner.generate(token_ids=[[1], [2], [3]], config=GenerationConfig(max_new_tokens=2))
    with pytest.raises(InputError, match="exceed the TensorRT profile's max total length 30"):
        runner.generate(token_ids=[[1] * 20], config=GenerationConfig(max_new_tokens=8))


def test_bad_generation_arguments(exported, capsys):
    folder = str(exported["cache"])
    for args, message in ((["--top-p", "0"], "--top-p"), (["--temperature", "-1"], "--temperature"),
                          (["--max-new-tokens", "0"], "--max-new-tokens"), (["--stop", "abc"], "--stop"),
                          (["--prefix-kv", folder, "--prefix-kv", folder, "--prefix-kv", folder], "3 prefix files")):
        code, text = run_cli(["generate", folder, "--token-ids", "1,2", *args], capsys)
        assert code == 2 and message in text, (args, text)
    code, text = run_cli(["generate", str(exported["folded"]), "--token-ids", "1,2", "--prefix-kv", folder], capsys)
    assert code == 2 and "--layout cache" in text


# ---- a provider that is not installed ------------------------------------------------------------


def _fake_export_folder(folder: Path) -> Path:
    """The smallest folder `generate` accepts up to choosing a provider: one graph, one config."""
    import onnx
    from onnx import TensorProto, helper

    folder.mkdir()
    graph = helper.make_graph([helper.make_node("Identity", ["input_ids"], ["logits"])], "g",
                              [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])],
                              [helper.make_tensor_value_info("logits", TensorProto.INT64, ["b", "s"])])
    model = helper.make_model(graph)
    for key, value in (("prefix_export.num_virtual_tokens", "2"), ("prefix_export.layout", "folded")):
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(folder / "model.onnx"))
    (folder / "config.json").write_text(json.dumps({"n_positions": 64}))
    return folder


def test_unknown_provider(tmp_path, capsys):
    folder = _fake_export_folder(tmp_path / "exported")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    code, text = run_cli(["generate", folder, "--token-ids", "1,2,3", "--provider", "foo"], capsys)
    assert code == 2, text
    assert "RuntimeSetupError" in text and "execution provider 'foo'" in text and "Installed:" in text
    assert "CPUExecutionProvider" in text
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
