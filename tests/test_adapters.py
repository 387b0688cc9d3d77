"""Many tasks, one folded graph: `--swappable-prefix` exports and `prefix-export adapter` files.

Per family (MHA, GQA, ALiBi, sliding window): a model with two trained tasks, A exported once with a
swappable prefix, an adapter file for each task. Every check compares with PEFT's own greedy loop for
that task (validate/reference.py, on PEFT's forward), through ONNX Runtime's RunOptions adapter API
(our runner) and through onnxruntime-genai's `set_active_adapter`, switching tasks on one loaded model.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from prefix_export.adapters import make_adapter, validate_adapter
from prefix_export.api import export_prefix_model, load_prefix_model
from prefix_export.cli import main
from prefix_export.errors import MismatchError, UnsupportedError
from prefix_export.runtime.adapters import ActiveAdapter, read_adapter
from prefix_export.runtime.generate import ExportRunner
from prefix_export.validate.reference import reference_greedy
from tests_helpers import genai_greedy
from tiny_models import make_prefix, tiny_config

FAMILIES = ["gpt2", "llama", "bloom", "mistral"]  # MHA + learned positions, GQA + rotary, ALiBi, sliding window
P = 4
NEW_TOKENS = 12
PROMPT = [5, 17, 42, 9, 33, 11]


def _save_model(model_type: str, folder: Path, seed: int = 1) -> None:
    """Untied, large random weights: greedy continuations vary, so a wrong task shows in the tokens."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, tie_word_embeddings=False)).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim >= 2:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    model.save_pretrained(folder)


def _peft_greedy(model_dir: Path, task: Path) -> list[int]:
    source = load_prefix_model(model_dir, task)
    return [int(t) for t in reference_greedy(source.peft_model, np.array(PROMPT), NEW_TOKENS)]


def _runner_greedy(runner: ExportRunner) -> list[int]:
    """Our runner, no stop token: every step is compared."""
    config = runner.default_config(max_new_tokens=NEW_TOKENS, stop_token_ids=())
    return runner.generate(token_ids=[PROMPT], config=config)["rows"][0]["new_token_ids"]


@pytest.fixture(scope="module", params=FAMILIES)
def case(request, tmp_path_factory):
    model_type = request.param
    root = tmp_path_factory.mktemp(f"adapters-{model_type}")
    model_dir = root / "model"
    _save_model(model_type, model_dir)
    tasks = {"A": make_prefix(model_dir, root / "A", P, projection=True, trained=True, seed=0),
             "B": make_prefix(model_dir, root / "B", P, projection=False, trained=True, seed=5)}
    out = root / "export"
    result = export_prefix_model(str(model_dir), tasks["A"], out, progress=False, swappable_prefix=True)
    assert result.validation.passed, result.validation.table()
    files = {name: root / f"{name}.onnx_adapter" for name in tasks}
    reports = {}
    for name, task in tasks.items():
        made = make_adapter(out, task, files[name])
        assert made.validation.passed, made.validation.table()
        reports[name] = made.report
    expected = {name: _peft_greedy(model_dir, task) for name, task in tasks.items()}
    # The tasks must differ, or no check below could tell one from the other.
    assert expected["A"] != expected["B"], f"{model_type}: both tasks give {expected['A']}"
    return dict(model_type=model_type, root=root, model_dir=model_dir, tasks=tasks, out=out, files=files,
                reports=reports, expected=expected, export_report=result.report)


def test_swappable_export_lists_the_prefix_as_overridable_inputs(case):
    import onnx

    graph = onnx.load(str(case["out"] / "model.onnx"), load_external_data=False).graph
    L = case["export_report"]["architecture"]["num_layers"]
    inputs = [i.name for i in graph.input]
    assert inputs[-2 * L:] == [f"prefix_{k}_{i}" for i in range(L) for k in ("key", "value")]
    assert set(inputs[-2 * L:]) <= {init.name for init in graph.initializer}  # with their defaults
    assert case["export_report"]["swappable_prefix"] is True
    meta = {p.key: p.value for p in onnx.load(str(case["out"] / "model.onnx"), load_external_data=False).metadata_props}
    assert meta["prefix_export.swappable_prefix"] == "1"


def test_each_adapter_gives_its_tasks_peft_tokens_through_run_options(case):
    expected = case["expected"]
    assert _runner_greedy(ExportRunner(case["out"])) == expected["A"], "no adapter: the exported task"
    for name in ("A", "B"):
        got = _runner_greedy(ExportRunner(case["out"], adapter=case["files"][name]))
        assert got == expected[name], f"{case['model_type']} task {name}: {got} != PEFT {expected[name]}"


def test_switching_tasks_on_one_loaded_model(case):
    runner = ExportRunner(case["out"])
    decoder = runner.engine.decoder
    for name in ("B", "A", "B", None, "B"):
        decoder.adapter = ActiveAdapter(case["files"][name]) if name else None
        assert _runner_greedy(runner) == case["expected"][name or "A"], f"after switching to {name}"


def test_genai_switches_tasks_with_set_active_adapter(case):
    try:
        import onnxruntime_genai as og
    except ImportError:
        pytest.fail("onnxruntime-genai is not installed (pip install 'prefix-export[deploy]')")
    model = og.Model(str(case["out"]))
    adapters = og.Adapters(model)
    for name, path in case["files"].items():
        adapters.load(str(path), name)
    eos = json.loads((case["out"] / "config.json").read_text()).get("eos_token_id")
    for name in ("B", "A", None, "B"):
        got = genai_greedy(model, PROMPT, NEW_TOKENS, adapters, name)
        want = case["expected"][name or "A"]
        # genai stops at eos (the runner above does not): compare up to its stop
        cut = next((k for k, t in enumerate(want) if t == eos), len(want))
        assert got[:cut] == want[:cut] and len(got) >= min(cut, 1), f"genai, task {name}: {got} != PEFT {want}"


def test_adapter_report_sizes_and_recheck(case, capsys):
    report = case["reports"]["B"]
    assert report["adapter"]["prefix_shape"][3] == P
    assert report["validation"]["passed"] and report["validation"]["greedy"]
    assert any(path.endswith("adapter_model.safetensors") or path.endswith("prefix_encoder.safetensors")
               for path in report["inputs"]["sha256"])
    with capsys.disabled():
        print(f"\n{case['model_type']}: adapter {report['adapter']['bytes']} bytes, graph {report['adapter']['graph_bytes']}"
              f" bytes ({report['adapter']['bytes'] / report['adapter']['graph_bytes']:.1%})")
    assert validate_adapter(case["files"]["B"]).passed


# ---- bad input: exit 2, a message, nothing written ----------------------------------------------


@pytest.fixture(scope="module")
def gpt2_case(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters-bad")
    model_dir = root / "model"
    _save_model("gpt2", model_dir)
    task = make_prefix(model_dir, root / "A", P, projection=True, trained=True, seed=0)
    out = root / "export"
    export_prefix_model(str(model_dir), task, out, progress=False, swappable_prefix=True)
    plain = root / "plain"
    export_prefix_model(str(model_dir), task, plain, progress=False)
    adapter = root / "A.onnx_adapter"
    make_adapter(out, task, adapter, run_validation=False)
    return dict(root=root, model_dir=model_dir, task=task, out=out, plain=plain, adapter=adapter)


def test_validate_fails_on_a_swapped_adapter_file(gpt2_case, tmp_path):
    """Another task's tensors under an adapter's name and report: the hash and the prefix check both fail (exit 1)."""
    other_task = make_prefix(gpt2_case["model_dir"], tmp_path / "B", P, projection=False, trained=True, seed=5)
    target = tmp_path / "B.onnx_adapter"
    made = make_adapter(gpt2_case["out"], other_task, target, greedy_tokens=4)
    assert made.validation.passed and validate_adapter(target).passed
    shutil.copy(gpt2_case["adapter"], target)  # A's tensors, B's report
    result = validate_adapter(target)
    failures = "\n".join(result.failures())
    assert not result.passed
    assert "changed since it was made" in failures and "prefix_key_0" in failures
    assert main(["validate", str(target), "-q"]) == 1


def _refused(argv, capsys, *needles) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    for needle in needles:
        assert needle in err, err
    return err


def _nothing_written(folder: Path, name: str) -> None:
    assert not (folder / name).exists() and not (folder / f"{name}.json").exists()
    assert not [p for p in folder.iterdir() if p.name.startswith(f".{name}.")], "a temporary file was left behind"


def test_adapter_for_a_different_base_model_is_refused(gpt2_case, tmp_path, capsys):
    other = tmp_path / "other-model"
    _save_model("gpt2", other, seed=9)  # same shapes, other weights
    task = make_prefix(other, tmp_path / "task", P, projection=True, trained=True, seed=2)
    # The export's own task, but run on another model of the same shapes (--model): the files' hashes differ.
    err = _refused(["adapter", str(gpt2_case["out"]), "--prefix", str(gpt2_case["task"]), "--model", str(other),
                    "--out", str(tmp_path / "x.onnx_adapter")], capsys, "is not the model", "sha256")
    assert "model.safetensors" in err
    _nothing_written(tmp_path, "x.onnx_adapter")
    # A task trained on the other model, with the export's own model: its adapter config names the other.
    _refused(["adapter", str(gpt2_case["out"]), "--prefix", str(task), "--out", str(tmp_path / "x.onnx_adapter")],
             capsys, "was trained on", str(other))
    _nothing_written(tmp_path, "x.onnx_adapter")


@pytest.mark.parametrize("change", ["layers", "prefix_length"])
def test_adapter_of_another_shape_is_refused_with_both_sides(gpt2_case, tmp_path, capsys, change):
    if change == "layers":
        other = tmp_path / "deeper"
        from tiny_models import save_tiny_model

        save_tiny_model(tiny_config("gpt2", n_layer=3), other)
        task, needles = make_prefix(other, tmp_path / "task", P, projection=False, trained=False), ("3 layers", "has 2")
    else:
        task = make_prefix(gpt2_case["model_dir"], tmp_path / "task", P + 2, projection=False, trained=False)
        needles = (f"P={P + 2}", f"P={P}")
    _refused(["adapter", str(gpt2_case["out"]), "--prefix", str(task), "--out", str(tmp_path / "x.onnx_adapter")],
             capsys, *needles)
    _nothing_written(tmp_path, "x.onnx_adapter")


def test_an_adapter_for_another_graph_is_refused_at_generate(gpt2_case, tmp_path, capsys):
    """An adapter file whose tensors have other shapes than the graph's prefix inputs (another model)."""
    from prefix_export.runtime.adapters import write_adapter

    wrong = tmp_path / "wrong.onnx_adapter"
    write_adapter(wrong, np.zeros((2, 2, 2, P, 8), np.float32))  # 2 KV heads, the graph has 4
    _refused(["generate", str(gpt2_case["out"]), "--token-ids", "1,2", "--adapter", str(wrong)], capsys,
             "prefix_key_0 is (1, 2, 4, 8)", "takes (1, 4, 4, 8)")
    write_adapter(wrong, np.zeros((2, 2, 4, P, 8), np.float16))  # the graph is float32
    _refused(["generate", str(gpt2_case["out"]), "--token-ids", "1,2", "--adapter", str(wrong)], capsys,
             "(1, 4, 4, 8) float16", "takes (1, 4, 4, 8) float32")
    write_adapter(wrong, np.zeros((3, 2, 4, P, 8), np.float32))  # 3 layers, the graph has 2
    _refused(["generate", str(gpt2_case["out"]), "--token-ids", "1,2", "--adapter", str(wrong)], capsys,
             "unknown tensors", "prefix_key_2")
    with pytest.raises(MismatchError):
        ExportRunner(gpt2_case["out"], adapter=wrong)


def test_a_truncated_adapter_file_is_refused(gpt2_case, tmp_path, capsys):
    truncated = tmp_path / "t.onnx_adapter"
    truncated.write_bytes(gpt2_case["adapter"].read_bytes()[:100])
    _refused(["generate", str(gpt2_case["out"]), "--token-ids", "1,2", "--adapter", str(truncated)], capsys,
             "not a readable ONNX Runtime adapter file", "truncated")
    shutil.copy(gpt2_case["adapter"].with_name("A.onnx_adapter.json"), tmp_path / "t.onnx_adapter.json")
    _refused(["validate", str(truncated)], capsys, "truncated")
    _refused(["generate", str(gpt2_case["out"]), "--token-ids", "1,2", "--adapter", str(tmp_path / "none.onnx_adapter")],
             capsys, "no such file")


def test_exports_that_cannot_take_adapters_say_why(gpt2_case, tmp_path, capsys):
    _refused(["adapter", str(gpt2_case["plain"]), "--prefix", str(gpt2_case["task"]), "--out",
              str(tmp_path / "x.onnx_adapter")], capsys, "--swappable-prefix")
    _refused(["generate", str(gpt2_case["plain"]), "--token-ids", "1,2", "--adapter", str(gpt2_case["adapter"])],
             capsys, "keeps its prefix constant", "--swappable-prefix")
    _refused(["--model", str(gpt2_case["model_dir"]), "--prefix", str(gpt2_case["task"]), "--out",
              str(tmp_path / "cache"), "--layout", "cache", "--swappable-prefix"], capsys, "--prefix-kv")
    assert not (tmp_path / "cache").exists()
    _refused(["adapter", str(gpt2_case["out"]), "--prefix", str(gpt2_case["task"]), "--out", str(tmp_path / "x.bin")],
             capsys, ".onnx_adapter")
    _nothing_written(tmp_path, "x.onnx_adapter")


def test_an_existing_adapter_is_kept_without_force(gpt2_case, tmp_path, capsys):
    target = tmp_path / "A.onnx_adapter"
    target.write_bytes(b"keep me")
    _refused(["adapter", str(gpt2_case["out"]), "--prefix", str(gpt2_case["task"]), "--out", str(target)], capsys,
             "--force")
    assert target.read_bytes() == b"keep me"
    assert main(["adapter", str(gpt2_case["out"]), "--prefix", str(gpt2_case["task"]), "--out", str(target),
                 "--force", "-q"]) == 0
    assert read_adapter(target)["prefix_key_0"].shape == (1, 4, P, 8)


def test_generate_cli_with_adapter(gpt2_case, capsys):
    capsys.readouterr()
    assert main(["generate", str(gpt2_case["out"]), "--token-ids", ",".join(map(str, PROMPT)), "--max-new-tokens",
                 "4", "--adapter", str(gpt2_case["adapter"]), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["rows"][0]["new_token_ids"]) >= 1


def test_unsupported_error_type_for_seq2seq_swappable(tmp_path):
    from prefix_export.export.kinds import kind_for
    from prefix_export.source import architectures

    spec = architectures.describe(tiny_config("t5"))
    with pytest.raises(UnsupportedError, match="encoder-decoder"):
        kind_for(spec, "folded", swappable_prefix=True)
