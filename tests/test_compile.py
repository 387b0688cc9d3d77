"""The compile step (`--optimize`, `--precision`, `prefix-export compile`): the fused graph of every
registered decoder family validates against PEFT in both layouts with the fusion counts the registry
expects; reduced precisions validate by agreement; a sabotaged fusion and low agreement fail."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from prefix_export.api import compile_export, export_prefix_model, validate_export
from prefix_export.compile.fusions import FusionMismatchError, expected_fusions
from prefix_export.compile.pipeline import META_COMPILE, CompileOptions
from prefix_export.compile.quantize import QuantizationSettings
from prefix_export.errors import ValidationError
from prefix_export.folder import ExportFolder, read_metadata
from prefix_export.source import architectures
from tests_helpers import assert_refused, genai_greedy, listing, run_cli
from tiny_models import TINY_CONFIGS, tiny_config

DECODERS = [t for t in architectures.supported_model_types()
            if architectures.describe(tiny_config(t)).family == architectures.FAMILY_DECODER]


def test_every_registered_decoder_family_has_a_tiny_model():
    assert set(DECODERS) <= set(TINY_CONFIGS)


def _fusion_line(report):
    fusion = report["compile"]["fusion"]
    return ", ".join(f"{k} {v['matched']}/{v['expected']}" for k, v in fusion["expected"].items())


@pytest.mark.parametrize("layout", ["folded", "cache"])
@pytest.mark.parametrize("model_type", DECODERS)
def test_optimize_validates_against_peft_with_every_expected_fusion(model_type, layout, family, tmp_path):
    model, prefix = family(model_type)
    result = export_prefix_model(str(model), prefix, tmp_path / "out", layout=layout, progress=False,
                                 compile_options=CompileOptions(optimize=True))
    report = result.report
    print(model_type, layout, _fusion_line(report), report["compile"]["fusion"]["not_fusable"])
    print(result.validation.table())
    assert result.validation.passed
    spec = architectures.describe(tiny_config(model_type))
    expected, reasons = expected_fusions(spec)
    fusion = report["compile"]["fusion"]
    assert {k: v["expected"] for k, v in fusion["expected"].items()} == expected
    assert all(v["matched"] == v["expected"] for v in fusion["expected"].values())
    assert fusion["not_fusable"] == reasons and all(len(why) > 40 for why in reasons.values())
    assert fusion["nodes_after"] < fusion["nodes_before"]
    # Attention fused wherever the registry does not say why not; greedy checked token for token.
    assert ("attention" in expected) == ("attention" not in reasons)
    assert result.validation.greedy and all(g["matching"] == g["new_tokens"] for g in result.validation.greedy)
    metadata = read_metadata(result.graph)
    assert json.loads(metadata[META_COMPILE])["optimize"] is True
    assert not (tmp_path / ".out.plain").exists()  # the plain scratch export is gone


def _sabotage_one_attention(graph_path):
    """Layer 0's Softmax written out as exp(x - max) / sum: the same numbers, but no attention pattern
    matches that layer any more, as if a model had an attention variant the fusion misses."""
    from onnx import helper, numpy_helper

    model = onnx.load(str(graph_path))
    softmax = next(n for n in model.graph.node if n.op_type == "Softmax")
    x, y = softmax.input[0], softmax.output[0]
    model.graph.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), "sabotage_axes"))
    nodes = [helper.make_node("ReduceMax", [x, "sabotage_axes"], ["sabotage_max"], keepdims=1),
             helper.make_node("Sub", [x, "sabotage_max"], ["sabotage_shifted"]),
             helper.make_node("Exp", ["sabotage_shifted"], ["sabotage_exp"]),
             helper.make_node("ReduceSum", ["sabotage_exp", "sabotage_axes"], ["sabotage_sum"], keepdims=1),
             helper.make_node("Div", ["sabotage_exp", "sabotage_sum"], [y])]
    index = list(model.graph.node).index(softmax)
    model.graph.node.remove(softmax)
    for offset, node in enumerate(nodes):
        model.graph.node.insert(index + offset, node)
    onnx.save(model, str(graph_path))


def test_a_sabotaged_fusion_fails_with_the_count_and_writes_nothing(family, tmp_path, capsys):
    model, prefix = family("llama")
    plain = export_prefix_model(str(model), prefix, tmp_path / "plain", progress=False)
    _sabotage_one_attention(plain.graph)
    with pytest.raises(FusionMismatchError, match=r"attention 1/2"):
        compile_export(plain.folder, tmp_path / "out" / "fused", CompileOptions(optimize=True), progress=False)
    assert listing(tmp_path / "out") == []
    (tmp_path / "out2").mkdir()
    code, text = run_cli(["compile", plain.folder, "--out", tmp_path / "out2" / "fused", "--optimize", "-q"], capsys)
    assert code == 1 and "attention 1/2 (matched/expected)" in text and "Traceback" not in text
    assert listing(tmp_path / "out2") == []


@pytest.fixture(scope="module")
def gpt2_plain(family, tmp_path_factory):
    model, prefix = family("gpt2")
    return export_prefix_model(str(model), prefix, tmp_path_factory.mktemp("gpt2plain") / "out", progress=False)


@pytest.mark.parametrize("precision,optimize", [("int8", True), ("int4", True), ("fp16", False),
                                                ("int8", False)])
def test_reduced_precisions_validate_by_agreement_and_recheck(precision, optimize, gpt2_plain, tmp_path, capsys):
    code, text = run_cli(["compile", gpt2_plain.folder, "--out", tmp_path / "c", "--precision", precision,
                          *(["--optimize"] if optimize else []), "--json"], capsys)
    assert code == 0, text
    report = json.loads(text[text.index("{"):])
    agreement = report["validation"]["agreement"]
    limits = agreement["thresholds"]
    for label in ("PEFT", "fp32 graph"):
        row = agreement["against"][label]
        print(precision, optimize, label, row["top1_agreement"], row["greedy_equal"], "/", agreement["greedy_prompts"])
        assert row["top1_agreement"] >= limits["top1"]
    assert report["compile"]["quantization"]["precision"] == precision
    metadata = read_metadata(tmp_path / "c" / "model.onnx")
    assert json.loads(metadata[META_COMPILE])["quantization"]["precision"] == precision
    ops = {n.op_type for n in onnx.load(str(tmp_path / "c" / "model.onnx")).graph.node}
    if precision in ("int8", "int4"):
        assert "MatMulNBits" in ops and report["compile"]["conversion"]["quantized_matmuls"] >= 9
    # `validate` rechecks by the same criteria (against PEFT: the fp32 graph is not in the folder).
    code, text = run_cli(["validate", tmp_path / "c"], capsys)
    print(text)
    assert code == 0 and "vs PEFT" in text and "validation PASSED" in text
    # and the runner generates with it
    code, text = run_cli(["generate", tmp_path / "c", "--token-ids", "5,17,42", "--max-new-tokens", "4"], capsys)
    assert code == 0 and len(text.strip().splitlines()[-1].split()) == 4


def test_agreement_below_the_threshold_exits_1_and_publishes_nothing(gpt2_plain, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    code, text = run_cli(["compile", gpt2_plain.folder, "--out", tmp_path / "out" / "c", "--precision", "int4",
                          "--min-top1", "1.01", "-q"], capsys)
    assert code == 1 and "top-1 agreement with PEFT" in text and "< 1.01" in text
    assert listing(tmp_path / "out") == []


def test_genai_runs_an_int4_folded_folder_with_our_runners_tokens(gpt2_plain, tmp_path, capsys):
    pytest.importorskip("onnxruntime_genai")
    result = compile_export(gpt2_plain.folder, tmp_path / "int4", CompileOptions(
        optimize=True, quantization=QuantizationSettings(precision="int4")), progress=False)
    assert result.validation.passed
    code, text = run_cli(["generate", result.folder, "--token-ids", "5,17,42,9", "--max-new-tokens", "8", "--json"],
                         capsys)
    ours = json.loads(text)["rows"][0]["new_token_ids"]
    assert genai_greedy(result.folder, [5, 17, 42, 9], 8) == ours


def test_compile_refuses_bad_input_before_writing(gpt2_plain, tmp_path, capsys, family):
    out = tmp_path / "out"
    out.mkdir()
    int8 = compile_export(gpt2_plain.folder, tmp_path / "int8", CompileOptions(
        quantization=QuantizationSettings(precision="int8")), progress=False)
    cases = [(["compile", int8.folder, "--out", out / "x", "--precision", "int4"], r"already a int8 graph"),
             (["compile", tmp_path, "--out", out / "x", "--optimize"], r"export_report\.json|not an export"),
             (["compile", gpt2_plain.folder, "--out", out / "x", "--precision", "int4", "--keep-8bit", "*nothing*"],
              r"matches no MatMul"),
             (["compile", gpt2_plain.folder, "--out", out / "x", "--precision", "int4", "--block-size", "24"],
              r"power of two"),
             (["compile", gpt2_plain.folder, "--out", gpt2_plain.folder, "--optimize"], r"already exists|new folder")]
    for args, pattern in cases:
        code, text = run_cli([*args, "-q"], capsys)
        assert_refused(code, text, out, pattern)


def test_export_flags_write_the_compiled_folder_in_one_command(family, tmp_path, capsys):
    model, prefix = family("qwen2")
    code, text = run_cli(["--model", model, "--prefix", prefix, "--out", tmp_path / "q", "--optimize",
                          "--precision", "int8", "-q"], capsys)
    print(text)
    assert code == 0 and "precision  int8" in text and "rotary 4/4" in text and "vs fp32 graph" in text
    folder = ExportFolder.open(tmp_path / "q")
    assert folder.report["compile"]["fusion"]["expected"]["attention"] == {"matched": 2, "expected": 2}
    assert validate_export(tmp_path / "q").passed
    with pytest.raises(ValidationError):  # the folder's graph replaced by a broken one fails the recheck
        graph = onnx.load(str(folder.graph))
        for init in graph.graph.initializer:
            if init.name.startswith("prefix_value"):
                init.CopyFrom(onnx.numpy_helper.from_array(np.zeros_like(onnx.numpy_helper.to_array(init)) + 3,
                                                           init.name))
        onnx.save(graph, str(folder.graph))
        result = validate_export(tmp_path / "q")
        if not result.passed:
            raise ValidationError("\n".join(result.failures()))
