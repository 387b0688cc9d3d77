"""Which runtimes run which compiled graphs: onnxruntime-genai and OpenVINO (Python API) on the
shipped variants (plain, fused, int8, int4, fp16) of a rotary family (llama) and a learned-position
family (gpt2), in both layouts where the runtime takes them. Where a runtime runs a graph it must
give our runner's greedy tokens; where it cannot, the test pins the reason, so that the README's
table (Deploy: which runtime runs what) is what CI measured."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from prefix_export.api import compile_export, export_prefix_model
from prefix_export.compile.agreement import Thresholds
from prefix_export.compile.pipeline import CompileOptions
from prefix_export.compile.quantize import QuantizationSettings
from prefix_export.folder import ExportFolder
from prefix_export.runtime.decoder import OnnxDecoder
from prefix_export.runtime.loop import greedy_generate
from prefix_export.runtime.sessions import create_session
from tests_helpers import genai_greedy
from tiny_models import make_prefix, save_tiny_model, tiny_config

PROMPT = [5, 17, 42, 9, 64]
# Which runtime runs a graph is the question here, not how well a 32-wide model survives 4 bits (its
# agreement is tested in test_compile.py): the agreement thresholds are off.
_ANY = Thresholds(top1=0.0, greedy=0.0)
VARIANTS = {"plain": None, "fused": CompileOptions(optimize=True),
            "int8": CompileOptions(optimize=True, quantization=QuantizationSettings(precision="int8"), thresholds=_ANY),
            "int4": CompileOptions(optimize=True, quantization=QuantizationSettings(precision="int4"), thresholds=_ANY),
            "fp16": CompileOptions(quantization=QuantizationSettings(precision="fp16"), thresholds=_ANY)}
# What OpenVINO 2026.4 cannot convert, by (family, variant): ONNX Runtime's contrib RotaryEmbedding.
OPENVINO_CANNOT = {("llama", v): "com.microsoft.RotaryEmbedding" for v in ("fused", "int8", "int4")}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    made = {}

    def get(model_type, layout, variant):
        key = (model_type, layout, variant)
        if key not in made:
            root = tmp_path_factory.mktemp(f"{model_type}-{layout}-{variant}")
            if (model_type, layout, "plain") not in made:
                save_tiny_model(tiny_config(model_type), root / "model")
                prefix = make_prefix(root / "model", root / "prefix", 4, projection=True, trained=True)
                made[(model_type, layout, "plain")] = export_prefix_model(
                    str(root / "model"), prefix, root / "plain", layout=layout, progress=False).folder
            if variant != "plain":
                made[key] = compile_export(made[(model_type, layout, "plain")], root / variant, VARIANTS[variant],
                                           progress=False).folder
        return ExportFolder.open(made[key])

    return get


def ours(folder: ExportFolder) -> list[int]:
    prefix = folder.read_prefix() if folder.layout == "cache" else None
    decoder = OnnxDecoder(create_session(folder.graph, "cpu", low_memory=folder.dtype != "float32"), prefix)
    ids = np.array([PROMPT], np.int64)
    return greedy_generate(decoder, ids, np.ones_like(ids), 8)[0].tolist()


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_genai_runs_every_shipped_variant_of_a_folded_export(model_type, variant, folders):
    pytest.importorskip("onnxruntime_genai")
    folder = folders(model_type, "folded", variant)
    assert genai_greedy(folder.path, PROMPT, 8) == ours(folder)


@pytest.mark.parametrize("layout", ["folded", "cache"])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_openvino_runs_what_it_can_convert_and_names_what_it_cannot(model_type, variant, layout, folders):
    if importlib.util.find_spec("openvino") is None:
        pytest.skip("openvino is not installed (the `cpp` extra; CI installs it)")
    from prefix_export.runtime.openvino import OpenVinoSession

    folder = folders(model_type, layout, variant)
    prefix = folder.read_prefix() if folder.layout == "cache" else None
    cannot = OPENVINO_CANNOT.get((model_type, variant))
    if cannot:
        with pytest.raises(RuntimeError, match=cannot):
            OpenVinoSession(folder.graph)
        return
    decoder = OnnxDecoder(OpenVinoSession(folder.graph), prefix)
    ids = np.array([PROMPT], np.int64)
    assert greedy_generate(decoder, ids, np.ones_like(ids), 8)[0].tolist() == ours(folder)
