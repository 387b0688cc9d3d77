"""`prefix-export bench` on a tiny GPT-2: the JSON, the table and the plot are written and sane.

No timing assertions (the machine is shared); what is checked is structure, the validations the bench
runs on each graph it builds (through the compile path), the fusion counts, int8/int4 agreement and that
the eager baseline really applies the prefix (its greedy tokens equal the validated export's).
"""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

from prefix_export import cli
from prefix_export.bench import probes, report, run
from prefix_export.bench.variants import Variant

TARGETS = Path(__file__).resolve().parents[1] / "tools" / "bench_targets.json"


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory, gpt2_dir, gpt2_adapter):
    out = tmp_path_factory.mktemp("bench")
    code = cli.main(["bench", "-q", "--model", str(gpt2_dir), "--prefix", str(gpt2_adapter), "--out", str(out),
                     "--batch-sizes", "1,2", "--contexts", "4,8", "--new-tokens", "4", "--optimize",
                     "--precision", "int8", "--precision", "int4", "--peers", "--threads", "1", "--bandwidth-mb", "16", "--rounds", "2",
                     "--targets", str(TARGETS)])
    assert code == 0
    return out, json.loads((out / run.BENCH_JSON).read_text())


def test_bench_writes_json_rows_for_every_backend_and_config(bench_run):
    _, result = bench_run
    backends = {row["backend"] for row in result["rows"]}
    ours = {"eager (PEFT, PyTorch)", "export fp32", "base fp32", "export fp32+fused", "base fp32+fused",
            "export int8", "base int8", "export int4", "base int4", "export[cache] fp32+fused",
            "export[cache] int8", "export[cache] int4"}
    # --peers: onnxruntime-genai and OpenVINO on every export graph (CI installs both: deploy, cpp extras)
    peers = {f"{runtime} {precision}" for runtime in ("genai", "openvino")
             for precision in ("fp32", "fp32+fused", "int8", "int4")
             if importlib.util.find_spec({"genai": "onnxruntime_genai"}.get(runtime, runtime)) is not None}
    assert backends == ours | peers, (backends ^ (ours | peers), result.get("peers_failed"))
    for name in backends:
        configs = sorted((r["batch"], r["context"]) for r in result["rows"] if r["backend"] == name)
        assert configs == [(1, 4), (1, 8), (2, 4), (2, 8)], name
    for row in result["rows"]:
        for key in ("prefill_ms", "decode_p50_ms", "decode_p90_ms", "tokens_per_s", "floor_ms", "x_floor"):
            assert math.isfinite(row[key]) and row[key] > 0, (row["backend"], key, row[key])
        assert row["decode_p90_ms"] >= row["decode_p50_ms"]
        assert len(row["tokens_row0"]) == 4 and len(row["decode_p50_per_round_ms"]) == 2
        assert row["peak_rss_mb"] > 0
    assert result["bandwidth"]["gb_per_s"] > 0
    assert result["machine"]["cpu_count"] >= 1 and "onnxruntime" in result["versions"]


def test_bench_peers_give_our_runners_tokens(bench_run):
    """genai and OpenVINO run the same graphs bench measures ours on, and pick the same greedy tokens."""
    _, result = bench_run
    matches = result["peers_match_export"] or {}
    assert matches and all(v.startswith("4/4") for v in matches.values()), matches
    assert not result.get("peers_failed"), result.get("peers_failed")


def test_bench_floor_counts_weights_and_the_kv_cache(bench_run):
    _, result = bench_run
    rows = [r for r in result["rows"] if r["backend"] == "export fp32"]
    small, large = (next(r for r in rows if (r["batch"], r["context"]) == c) for c in ((1, 4), (2, 8)))
    # Tiny GPT-2: 2 layers, 4 heads of 8, P = 4; at the median step the cache holds P + C + 2 positions.
    weights = next(v["weights_read_per_token"] for v in result["variants"] if v["name"] == "export fp32")
    assert small["bytes_per_token"] == weights + 2 * 2 * 1 * 4 * (4 + 4 + 2) * 8 * 4
    assert large["bytes_per_token"] == weights + 2 * 2 * 2 * 4 * (4 + 8 + 2) * 8 * 4
    assert small["floor_ms"] == pytest.approx(small["bytes_per_token"] / (result["bandwidth"]["gb_per_s"] * 1e9) * 1e3,
                                              rel=1e-2)


def test_bench_validates_what_it_measures(bench_run):
    _, result = bench_run
    variants = {v["name"]: v for v in result["variants"]}
    assert variants["export fp32"]["validation"]["passed"]
    assert variants["base fp32"]["validation"]["passed"]  # base export vs the base model's forward
    fused = variants["export fp32+fused"]
    assert fused["validation"]["passed"]
    fusion = fused["compile"]["fusion"]  # made by the compile path, as `compile --optimize` ships it
    assert fusion["expected"]["attention"] == {"matched": 2, "expected": 2}
    assert fusion["expected"]["gelu"] == {"matched": 2, "expected": 2}
    assert fusion["expected"]["normalization"] == {"matched": 5, "expected": 5}
    assert fusion["missing"] == [] and fusion["nodes_after"] < fusion["nodes_before"]
    for precision in ("int8", "int4"):
        reduced = variants[f"export {precision}"]
        assert reduced["compile"]["quantization"]["precision"] == precision and reduced["compile"]["optimize"]
        agreement = reduced["validation"]["agreement"]
        assert reduced["validation"]["passed"] and set(agreement["against"]) == {"PEFT", "fp32 graph"}
        assert agreement["against"]["PEFT"]["top1_agreement"] >= agreement["thresholds"]["top1"]
        assert variants[f"base {precision}"]["cache_layout_validation"]["passed"]
    embedded = result["agreement_embedded"]
    assert {"int8", "int4"} <= set(embedded) and embedded["int8"]["agreement"]["task"]["records"] > 0
    # The eager baseline applies the prefix: its greedy tokens are the validated export's.
    assert all(v.startswith("4/4") for v in result["eager_matches_export"].values()), result["eager_matches_export"]
    assert result["optimize_decision"]["kept"] in (True, False)
    assert set(result["optimize_decision"]["by_backend"]) == {"export fp32", "export[cache] fp32"}
    assert "base rows" in result["optimize_decision"]["by_backend"]["export[cache] fp32"]["why"]
    assert set(result["targets"]) >= {"export_vs_eager", "prefix_cost", "export_vs_floor", "int8_vs_fp32",
                                      "int4_vs_fp32", "int4_vs_int8", "int8_top1_agreement", "layout"}
    assert set(result["targets"]["by_layout"]) == {"folded", "cache"}


def test_bench_cache_layout_runs_the_base_graph_with_the_prefix(bench_run):
    """The cache layout is the base graph with the prefix fed as the first past: validated against PEFT,
    its greedy tokens are the folded export's, and it holds P more positions than the bare base graph."""
    _, result = bench_run
    variants = {v["name"]: v for v in result["variants"]}
    for name in ("base fp32", "base fp32+fused"):
        validation = variants[name]["cache_layout_validation"]
        assert validation["passed"], validation["failures"]
        assert validation["summary"][0]["check"] == "prefix"  # the prefix file checked against PEFT's
    rows = {(r["backend"], r["batch"], r["context"]): r for r in result["rows"]}
    for batch, context in ((1, 4), (1, 8), (2, 4), (2, 8)):
        # With --optimize the cache layout runs the fused base graph (the plain one is measured bare).
        folded, cache = rows[("export fp32+fused", batch, context)], rows[("export[cache] fp32+fused", batch, context)]
        bare = rows[("base fp32+fused", batch, context)]
        assert cache["tokens_row0"] == folded["tokens_row0"] == rows[("eager (PEFT, PyTorch)", batch, context)][
            "tokens_row0"]
        assert cache["layout"] == "cache" and folded["layout"] == "folded"
        assert cache["bytes_per_token"] - bare["bytes_per_token"] == 2 * 2 * batch * 4 * 4 * 8 * 4  # P=4 positions


def test_bench_plot_and_table(bench_run):
    import matplotlib.image

    out, result = bench_run
    png = out / run.BENCH_PNG
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(str(png))
    assert image.shape[0] > 200 and image.shape[1] > 400
    table = report.format_table(result)
    assert "eager (PEFT, PyTorch)" in table and "x floor" in table and "targets (B=1, ctx=8" in table


def test_bandwidth_is_positive_and_documented():
    measured = probes.measure_bandwidth(size_mb=8, passes=2, threads=2)
    assert measured["gb_per_s"] > 0 and len(measured["passes_gb_per_s"]) == 3
    assert "np.dot" in measured["method"]


def test_bench_rejects_missing_inputs(tmp_path, capsys):
    assert cli.main(["bench", "--out", str(tmp_path)]) == 2
    assert "needs --model and --prefix" in capsys.readouterr().err
    assert cli.main(["bench", "--model", "x", "--prefix", "y", "--contexts", "a,b", "--out", str(tmp_path)]) == 2
    assert "comma-separated integers" in capsys.readouterr().err


def test_agreement_counts_top1_positions_and_greedy_equality():
    from prefix_export.compile.agreement import Thresholds, judge, measure

    class Fixed:
        """A stand-in scorer whose next token is (token + shift) % 16."""

        def __init__(self, shift, label="fixed"):
            self.shift, self.label = shift, label

        def logits(self, ids):
            logits = np.zeros((ids.size, 16), np.float32)
            np.put_along_axis(logits, ((ids + self.shift) % 16)[:, None], 1.0, axis=-1)
            return logits

        def greedy(self, ids, steps, eos):
            out, token = [], ids[-1]
            for _ in range(steps):
                token = (token + self.shift) % 16
                out.append(token)
            return np.array(out)

    prompts = [np.arange(5), np.arange(3)]
    same = measure(Fixed(1), [Fixed(1, "a")], prompts, greedy_prompts=2, greedy_tokens=4)
    assert same["positions"] == 8 and same["against"]["a"]["top1_agreement"] == 1.0
    assert same["against"]["a"]["greedy_equal"] == 2 and judge(same, Thresholds(0.9, 1.0)) == []
    other = measure(Fixed(1), [Fixed(2, "b")], prompts, greedy_prompts=2, greedy_tokens=4)
    assert other["against"]["b"]["top1_agreement"] == 0.0 and other["against"]["b"]["greedy"][0]["first_divergence"] == 0
    assert any("top-1 agreement with b 0.000 < 0.9" in f for f in judge(other, Thresholds(0.9, 0.0)))


def test_backends_on_a_gpu_provider_run_eager_there_and_keep_int8_on_the_cpu(tmp_path):
    """What `bench --provider cpu --provider cuda` measures, decided without a GPU: eager PyTorch on both
    devices, every graph on both providers except int8 (CPU kernels), the cache layout on both."""
    from safetensors.numpy import save_file

    prefix_file = tmp_path / "prefix_kv.safetensors"
    save_file({"prefix_kv": np.zeros((2, 2, 4, 3, 8), np.float32)}, str(prefix_file))
    passed = {"cache_layout_validation": {"passed": True}}
    variants = [Variant("export fp32", tmp_path / "e.onnx", "export", "fp32", 1.0, weights_read=10),
                Variant("base fp32", tmp_path / "b.onnx", "base", "fp32", 1.0, dict(passed), weights_read=10),
                Variant("base fp32+fused", tmp_path / "bf.onnx", "base", "fp32+fused", 1.0, dict(passed),
                              weights_read=10),
                Variant("base int8", tmp_path / "b8.onnx", "base", "int8", 1.0, weights_read=3)]
    settings = run.BenchSettings(providers=("cpu", "cuda"))
    backends = {b.name: b for b in run._backends(variants, settings, object(), 3, prefix_file, "folded", True)}
    assert set(backends) == {"eager (PEFT, PyTorch)", "eager (PEFT, PyTorch) [cuda]", "export fp32",
                             "export fp32 [cuda]", "base fp32", "base fp32 [cuda]", "base fp32+fused",
                             "base fp32+fused [cuda]", "base int8", "export[cache] fp32+fused",
                             "export[cache] fp32+fused [cuda]", "export[cache] int8"}
    assert backends["eager (PEFT, PyTorch) [cuda]"].provider == "torch:cuda"
    assert backends["export[cache] fp32+fused [cuda]"].prefix.shape == (2, 2, 4, 3, 8)
    assert backends["export[cache] fp32+fused"].prefix_length == 3 and backends["base fp32+fused"].prefix_length == 0
    # Without CUDA in PyTorch there is no GPU bandwidth (and no eager row on the GPU).
    import torch

    if not torch.cuda.is_available():
        assert probes.measure_gpu_bandwidth(8) is None
        no_gpu = run._backends(variants, settings, object(), 3, prefix_file, "folded", False)
        assert not any(b.provider == "torch:cuda" for b in no_gpu)


def test_bench_on_a_cache_layout_export_folder(tmp_path, gpt2_dir, gpt2_adapter):
    """`bench OUT_DIR` on a --layout cache export feeds its prefix, validates it as such, and checks the
    eager baseline's tokens against it."""
    folder = tmp_path / "cache"
    assert cli.main(["-q", "--model", str(gpt2_dir), "--prefix", str(gpt2_adapter), "--out", str(folder),
                     "--layout", "cache"]) == 0
    out = tmp_path / "bench"
    assert cli.main(["bench", "-q", str(folder), "--out", str(out), "--batch-sizes", "1", "--contexts", "4",
                     "--new-tokens", "4", "--threads", "1", "--bandwidth-mb", "16", "--rounds", "1"]) == 0
    result = json.loads((out / run.BENCH_JSON).read_text())
    assert {r["backend"] for r in result["rows"]} == {"eager (PEFT, PyTorch)", "export[cache] fp32", "base fp32"}
    assert next(v for v in result["variants"] if v["name"] == "export fp32")["validation"]["passed"]
    assert result["eager_matches_export"] == {"B=1 C=4": "4/4 leading tokens equal"}
    assert result["targets"]["layout"] == "cache"


def test_bench_without_matplotlib_refuses_before_any_work(tmp_path, gpt2_dir, gpt2_adapter, capsys, monkeypatch):
    """A missing `bench` extra is named at once (exit 2), not after minutes of measuring."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    out = tmp_path / "bench"
    code = cli.main(["bench", "--model", str(gpt2_dir), "--prefix", str(gpt2_adapter), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "matplotlib" in err and 'pip install -e ".[bench]"' in err
    assert not out.exists(), "bench did work before refusing"


def test_plot_of_a_single_configuration_shows_bars_and_the_floor():
    """One context: a bar per backend and the floor as a line (a line plot over one point shows nothing)."""
    import matplotlib.pyplot as plt

    rows = [{"backend": name, "kind": kind, "layout": layout, "precision": "fp32", "provider": "cpu", "batch": 1,
             "context": 32, "decode_p50_ms": ms, "floor_ms": 5.0}
            for name, kind, layout, ms in (("export fp32", "export", "folded", 9.0), ("base fp32", "base", "-", 8.0))]
    fig = report.plot_figure({"rows": rows, "machine": {}, "bandwidth": {}})
    ax = fig.axes[0]
    assert [round(p.get_height(), 1) for p in ax.patches] == [9.0, 8.0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["export fp32", "base fp32"]
    floor = [line for line in ax.get_lines() if line.get_label() == "fp32 bandwidth floor"]
    assert len(floor) == 1 and set(floor[0].get_ydata()) == {5.0}
    plt.close(fig)


# ---- torch.compile (`bench --torch-compile`) ------------------------------------------------------
# Real inductor compiles (no dynamo backend override): a few seconds per shape on these tiny models.


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def lively_prefixed(request, tmp_path_factory):
    """A tiny model with large random weights (varied greedy tokens) and its PEFT prefix (P=4), loaded."""
    from tiny_models import make_prefix, save_tiny_model, tiny_config

    from prefix_export.api import load_prefix_model

    root = tmp_path_factory.mktemp(f"lively_{request.param}")
    save_tiny_model(tiny_config(request.param, initializer_range=0.3), root / "model", seed=1)
    adapter = make_prefix(root / "model", root / "adapter", 4, projection=True, trained=True)
    return load_prefix_model(str(root / "model"), adapter)


class _Recording:
    """A stepper that keeps each step's logits (B, 1, V) of the stepper it wraps."""

    def __init__(self, stepper):
        self.stepper, self.first_tokens, self.logits = stepper, stepper.first_tokens, []

    def step(self, tokens):
        self.logits.append(self.stepper.step(tokens))
        return self.logits[-1]


def test_torch_compile_picks_eager_tokens_with_one_graph_per_shape(lively_prefixed):
    """torch.compile of the decode steps on a static cache picks eager PEFT's greedy tokens (every row, 10
    tokens), with logits within float noise; one graph for the shape, reused by a second run (no compile in
    a timed run)."""
    from torch._dynamo.utils import counters

    from prefix_export.bench.backends import Backend
    from prefix_export.runtime.loop import GenerationConfig, generate

    new_tokens = 10
    peft_model = lively_prefixed.peft_model
    compiled = Backend("torch_compile", "-", "fp32", "torch:cpu", None, 0, 4, 0.0)
    assert compiled.name == "torch.compile (PEFT, default)" and compiled.key()["compile_mode"] == "default"
    live = compiled.open(peft_model, 1, new_tokens)
    eager = Backend("eager", "-", "fp32", "torch:cpu", None, 0, 4, 0.0).open(peft_model, 1)
    prompt = np.random.default_rng(5).integers(3, lively_prefixed.base.spec.vocab_size, (2, 6))
    reference = _Recording(eager.stepper(prompt, new_tokens))
    expected = generate(reference, GenerationConfig.greedy(new_tokens))
    assert len(np.unique(expected)) >= 3, expected  # varied tokens: equality below is not a repeated token
    graphs = counters["stats"]["unique_graphs"]
    for run_index in range(2):
        recording = _Recording(live.stepper(prompt, new_tokens))
        tokens = generate(recording, GenerationConfig.greedy(new_tokens))
        np.testing.assert_array_equal(tokens, expected, err_msg=f"run {run_index}")
        np.testing.assert_allclose(np.concatenate(recording.logits, 1), np.concatenate(reference.logits, 1),
                                   atol=1e-4, rtol=0, err_msg=f"run {run_index}")
        if run_index == 0:
            compile_s = live.session_s
            assert compile_s > 0
    assert counters["stats"]["unique_graphs"] - graphs == 1, "one graph for one (batch, cache length)"
    assert live.session_s == compile_s, "the second run compiled again"
    with pytest.raises(ValueError, match="sized for 10"):
        live.stepper(prompt, new_tokens + 1)
    live.close()


def test_torch_compile_refuses_a_sliding_window_shorter_than_its_cache(tmp_path):
    """A sliding window shorter than the static cache is refused (no compile): transformers' static sliding
    layers would recompile every step; GPT-Neo's local layers would pick other tokens."""
    from tiny_models import make_prefix, save_tiny_model, tiny_config

    from prefix_export.api import load_prefix_model
    from prefix_export.bench.backends import Backend

    save_tiny_model(tiny_config("mistral"), tmp_path / "model")  # window 8
    adapter = make_prefix(tmp_path / "model", tmp_path / "adapter", 4, projection=True, trained=False)
    source = load_prefix_model(str(tmp_path / "model"), adapter)
    live = Backend("torch_compile", "-", "fp32", "torch:cpu", None, 0, 4, 0.0).open(source.peft_model, 1, 4)
    with pytest.raises(NotImplementedError, match="sliding window of 8 positions, shorter than the static cache of 9"):
        live.stepper(np.ones((1, 2), np.int64), 4)


def test_torch_compile_runs_where_eager_runs_with_its_mode_named(tmp_path):
    """`--torch-compile` with a GPU provider: on the CPU (mode default: no CUDA graphs there) and on the GPU
    (reduce-overhead); off by default."""
    variants = [Variant("export fp32", tmp_path / "e.onnx", "export", "fp32", 1.0, weights_read=10)]
    settings = run.BenchSettings(providers=("cpu", "cuda"), torch_compile=True)
    backends = {b.name: b for b in run._backends(variants, settings, object(), 3, None, "folded", True)}
    assert set(backends) == {"eager (PEFT, PyTorch)", "eager (PEFT, PyTorch) [cuda]", "torch.compile (PEFT, default)",
                             "torch.compile (PEFT, reduce-overhead) [cuda]", "export fp32", "export fp32 [cuda]"}
    assert backends["torch.compile (PEFT, reduce-overhead) [cuda]"].key() == {
        "backend": "torch.compile (PEFT, reduce-overhead) [cuda]", "kind": "torch_compile", "layout": "-",
        "precision": "fp32", "provider": "torch:cuda", "compile_mode": "reduce-overhead"}
    default = run._backends(variants, run.BenchSettings(), object(), 3, None, "folded", False)
    assert not any(b.kind == "torch_compile" for b in default)


def test_bench_torch_compile_writes_its_row_with_the_mode(tmp_path, exports):
    """`bench --torch-compile`: a row beside eager, its mode recorded, eager's greedy tokens, the compile
    time as its session_s."""
    out = tmp_path / "bench"
    assert cli.main(["bench", "-q", str(exports["folded"]), "--out", str(out), "--torch-compile", "--no-base",
                     "--batch-sizes", "1", "--contexts", "4", "--new-tokens", "8", "--threads", "1",
                     "--bandwidth-mb", "16", "--rounds", "1"]) == 0
    result = json.loads((out / run.BENCH_JSON).read_text())
    rows = {r["backend"]: r for r in result["rows"]}
    assert set(rows) == {"eager (PEFT, PyTorch)", "torch.compile (PEFT, default)", "export fp32"}
    compiled = rows["torch.compile (PEFT, default)"]
    assert (compiled["kind"], compiled["provider"], compiled["compile_mode"]) == ("torch_compile", "torch:cpu",
                                                                                 "default")
    assert "compile_mode" not in rows["eager (PEFT, PyTorch)"]
    assert compiled["tokens_row0"] == rows["eager (PEFT, PyTorch)"]["tokens_row0"] == rows["export fp32"]["tokens_row0"]
    assert len(compiled["tokens_row0"]) == 8 and compiled["session_s"] > 0 and compiled["decode_p50_ms"] > 0
    assert result["torch_compile_matches_eager"] == {
        "torch.compile (PEFT, default) B=1 C=4": "8/8 leading tokens equal"}
    assert result["settings"]["torch_compile"] and not result.get("backends_failed")
    assert {"backend": "torch.compile (PEFT, default)", "compile_mode": "default"}.items() <= next(
        b for b in result["backends"] if b["kind"] == "torch_compile").items()


def test_bench_records_a_torch_compile_failure_and_measures_the_rest(tmp_path, exports, monkeypatch):
    """A torch.compile that fails (no compiler, unsupported model) skips its row with the error recorded."""
    import torch

    def no_compiler(fn, **options):
        def compiled(*args, **kwargs):
            raise RuntimeError("InductorError: no working C++ compiler found")
        return compiled

    monkeypatch.setattr(torch, "compile", no_compiler)
    out = tmp_path / "bench"
    assert cli.main(["bench", "-q", str(exports["folded"]), "--out", str(out), "--torch-compile", "--no-base",
                     "--batch-sizes", "1", "--contexts", "4", "--new-tokens", "4", "--threads", "1",
                     "--bandwidth-mb", "16", "--rounds", "1"]) == 0
    result = json.loads((out / run.BENCH_JSON).read_text())
    assert {r["backend"] for r in result["rows"]} == {"eager (PEFT, PyTorch)", "export fp32"}
    (failed,) = result["backends_failed"]
    assert failed["backend"] == "torch.compile (PEFT, default)" and failed["compile_mode"] == "default"
    assert failed["error"] == "RuntimeError: InductorError: no working C++ compiler found"
    assert result["torch_compile_matches_eager"] is None and not result.get("peers_failed")


def test_bench_kv_buffer_shared_runs_the_shared_graphs_with_export_tokens(tmp_path, gpt2_dir, gpt2_adapter):
    """`bench --optimize --kv-buffer shared`: the shared-KV-buffer graphs of the export and of the base (bare,
    and with the prefix pre-filled: export[cache]) are compiled, validated and timed, with the export's tokens."""
    out = tmp_path / "bench"
    assert cli.main(["bench", "-q", "--model", str(gpt2_dir), "--prefix", str(gpt2_adapter), "--out", str(out),
                     "--optimize", "--kv-buffer", "shared", "--no-eager", "--batch-sizes", "1,2", "--contexts", "4",
                     "--new-tokens", "6", "--threads", "1", "--bandwidth-mb", "16", "--rounds", "1"]) == 0
    result = json.loads((out / run.BENCH_JSON).read_text())
    rows = {(r["backend"], r["batch"]): r for r in result["rows"]}
    for batch in (1, 2):
        plain = rows[("export fp32", batch)]["tokens_row0"]
        for name in ("export fp32+shared", "export[cache] fp32+shared"):
            assert rows[(name, batch)]["tokens_row0"] == plain, name
        assert rows[("base fp32+shared", batch)]["tokens_row0"] == rows[("base fp32", batch)]["tokens_row0"]
    shared = next(v for v in result["variants"] if v["name"] == "export fp32+shared")
    assert shared["validation"]["passed"]
    assert not any("cuda-graph" in b["backend"] for b in result["backends"])  # CPU: nothing captured


def test_cuda_graph_rows_only_for_shared_graphs_on_cuda(tmp_path):
    from safetensors.numpy import save_file

    prefix_file = tmp_path / "prefix_kv.safetensors"
    save_file({"prefix_kv": np.zeros((2, 2, 4, 3, 8), np.float32)}, str(prefix_file))
    passed = {"cache_layout_validation": {"passed": True}}
    variants = [Variant("export fp32", tmp_path / "e.onnx", "export", "fp32", 1.0, weights_read=10),
                Variant("export fp16+shared", tmp_path / "es.onnx", "export", "fp16+shared", 1.0, weights_read=5),
                Variant("base fp16+shared", tmp_path / "bs.onnx", "base", "fp16+shared", 1.0, dict(passed),
                        weights_read=5)]
    settings = run.BenchSettings(providers=("cpu", "cuda"), kv_buffer_shared=True, cuda_graph=True, eager=False)
    backends = {b.name: b for b in run._backends(variants, settings, object(), 3, prefix_file, "folded", True)}
    captured = {name for name, b in backends.items() if b.cuda_graph}
    assert captured == {"export fp16+shared+cuda-graph [cuda]", "base fp16+shared+cuda-graph [cuda]",
                        "export[cache] fp16+shared+cuda-graph [cuda]"}
    assert "export fp16+shared [cuda]" in backends and "export fp16+shared" in backends
    assert not any(b.cuda_graph for b in run._backends(variants, run.BenchSettings(providers=("cpu", "cuda")),
                                                       object(), 3, prefix_file, "folded", True))
