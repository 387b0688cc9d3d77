"""The runtimes users deploy on reproduce our greedy tokens: onnxruntime-genai, optimum, Node.js, the browser.

One export per registered architecture (tiny model, trained prefix) plus the embedded default, made
once per session. "Our tokens" are the package's own greedy loop on ONNX Runtime, which the export's
validation has compared with PEFT's forward; each runtime must give the same ids, stopping after the
same end token. Every runtime is driven as a user would drive it, knowing nothing of the prefix.

A runtime that is missing (genai not installed, no optimum venv, no node_modules, no chromium) skips
here with the reason, and fails under CI (CI=true), where .ci/run installs all of them.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from prefix_export import architectures
from prefix_export.api import export_prefix_model
from prefix_export.genai import GENAI_CONFIG_FILE, context_length
from prefix_export.runtime import OnnxDecoder, create_session, greedy_generate
from tiny_models import TINY_CONFIGS, make_prefix, tiny_config

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = ROOT / "models" / "default"
OPTIMUM_PYTHON = ROOT / os.environ.get("OPTIMUM_VENV", ".ci-optimum-venv") / "bin" / "python"
NODE_DIR = ROOT / "js" / "node"
WEB_DIR = ROOT / "js" / "web"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")

PROMPT = [5, 17, 42, 9, 64, 3, 77]
NEW_TOKENS = 16
NUM_VIRTUAL_TOKENS = 3
FAMILIES = architectures.supported_model_types()


def require(condition: bool, reason: str) -> None:
    """Skip locally when a runtime is missing; under CI, where .ci/run installs it, fail instead."""
    if condition:
        return
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{reason} (CI must install it: see .ci/run)")
    pytest.skip(reason)


@dataclasses.dataclass
class Case:
    name: str
    folder: Path
    prompt: list[int]
    expected: list[int]  # our greedy tokens, ending at the first end token when one is generated
    eos_token_id: int | list[int] | None


def _tiny_varied_model(model_type: str, folder: Path) -> None:
    """A tiny model whose greedy output varies (default inits give one token repeated), saved to folder."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type)).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim >= 2:  # matrices and embeddings; norms and biases keep their init
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    model.save_pretrained(folder)


def _eos(folder: Path):
    for name in ("generation_config.json", "config.json"):
        path = folder / name
        if path.is_file():
            value = json.loads(path.read_text()).get("eos_token_id")
            if value is not None:
                return value
    return None


def _build_case(name: str, model_dir: Path, prefix: Path, out: Path, prompt: list[int]) -> Case:
    result = export_prefix_model(str(model_dir), prefix, out, progress=False)
    assert result.validation.passed, result.validation.table()
    eos = _eos(out)
    decoder = OnnxDecoder(create_session(result.graph))
    first_eos = eos[0] if isinstance(eos, list) else eos  # greedy_generate takes one id
    new = greedy_generate(decoder, np.array([prompt]), np.ones((1, len(prompt)), np.int64), NEW_TOKENS,
                          first_eos)[0].tolist()
    return Case(name, out, prompt, _until_eos(new, eos), eos)


def _until_eos(tokens: list[int], eos) -> list[int]:
    ends = set(eos if isinstance(eos, list) else [eos]) - {None}
    for i, token in enumerate(tokens):
        if token in ends:
            return tokens[: i + 1]
    return tokens


class Cases:
    """Export folders made on first use and kept for the session."""

    def __init__(self, root: Path):
        self.root = root
        self.cases: dict[str, Case] = {}

    def get(self, name: str) -> Case:
        if name not in self.cases:
            self.cases[name] = self._make(name)
        return self.cases[name]

    def _make(self, name: str) -> Case:
        folder = self.root / name
        if name == "default":
            require((DEFAULT_MODEL / "base").is_dir() and (DEFAULT_MODEL / "prefix").is_dir(),
                    f"the embedded default model is not in {DEFAULT_MODEL} yet")
            return _build_case(name, DEFAULT_MODEL / "base", DEFAULT_MODEL / "prefix", folder / "out", PROMPT)
        assert name in TINY_CONFIGS, f"{name} is registered but has no tiny config in tests/tiny_models.py"
        _tiny_varied_model(name, folder / "model")
        make_prefix(folder / "model", folder / "prefix", NUM_VIRTUAL_TOKENS, projection=True, trained=True)
        return _build_case(name, folder / "model", folder / "prefix", folder / "out", PROMPT)


@pytest.fixture(scope="session")
def cases(tmp_path_factory) -> Cases:
    return Cases(tmp_path_factory.mktemp("deploy"))


CASE_NAMES = ["default", *FAMILIES]


# ---- onnxruntime-genai ---------------------------------------------------------------------------


def genai_greedy(folder: Path, prompt: list[int], max_new_tokens: int) -> list[int]:
    """What a genai user writes: Model(folder), greedy search options, append the prompt, step."""
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + max_new_tokens)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array([prompt], dtype=np.int32))
    new = []
    while not generator.is_done():
        generator.generate_next_token()
        new.append(int(generator.get_next_tokens()[0]))
    return new


@pytest.mark.parametrize("name", CASE_NAMES)
def test_genai_reproduces_greedy(cases, name):
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        require(False, "onnxruntime-genai is not installed (pip install 'prefix-export[deploy]')")
    case = cases.get(name)
    got = genai_greedy(case.folder, case.prompt, NEW_TOKENS)
    assert got == case.expected, f"{name}: genai {got} != ours {case.expected}"
    assert len(set(case.expected)) > 1 or len(case.expected) < NEW_TOKENS or name == "default", \
        f"{name}: the model repeats one token, so this comparison proves little: {case.expected}"


def test_genai_config_matches_the_export(cases):
    case = cases.get("gpt2")
    config = json.loads((case.folder / GENAI_CONFIG_FILE).read_text())
    spec = architectures.describe(tiny_config("gpt2"))
    model = config["model"]
    # A learned position table: the prefix takes P of its rows, the user gets the rest.
    assert model["context_length"] == spec.max_positions - NUM_VIRTUAL_TOKENS == context_length(spec, 3)
    assert config["search"]["max_length"] == model["context_length"]
    assert config["search"]["past_present_share_buffer"] is False
    decoder = model["decoder"]
    assert (decoder["num_hidden_layers"], decoder["num_key_value_heads"], decoder["head_size"]) == \
        (spec.num_layers, spec.num_kv_heads, spec.head_dim)
    assert decoder["inputs"]["past_key_names"] % 1 == "past_key_values.1.key"
    assert decoder["outputs"]["present_value_names"] % 0 == "present.0.value"
    assert model["eos_token_id"] == TINY_CONFIGS["gpt2"]["eos_token_id"]


# ---- optimum (its own venv: optimum-onnx pins transformers < 4.58) ---------------------------------


@pytest.fixture(scope="session")
def optimum_results(cases) -> dict[str, dict]:
    """One run of tools/optimum_generate.py over every case (its imports take seconds)."""
    require(OPTIMUM_PYTHON.is_file(), f"the optimum venv is absent ({OPTIMUM_PYTHON}); .ci/run creates it")
    names = [n for n in CASE_NAMES if n != "default" or (DEFAULT_MODEL / "base").is_dir()]
    jobs = [{"folder": str(cases.get(n).folder), "prompt": cases.get(n).prompt, "max_new_tokens": NEW_TOKENS}
            for n in names]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    run = subprocess.run([str(OPTIMUM_PYTHON), str(ROOT / "tools" / "optimum_generate.py")], input=json.dumps(jobs),
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    return dict(zip(names, results))


@pytest.mark.parametrize("name", CASE_NAMES)
def test_optimum_reproduces_greedy(cases, optimum_results, name):
    case = cases.get(name)
    result = optimum_results[name]
    assert "error" not in result, f"{name}: ORTModelForCausalLM failed on the export folder: {result['error']}"
    got = _until_eos(result["new_token_ids"], case.eos_token_id)
    assert got == case.expected, f"{name}: optimum {got} != ours {case.expected}"


# ---- Node.js (onnxruntime-node) --------------------------------------------------------------------


def node_greedy(folder: Path, prompt: list[int], max_new_tokens: int) -> dict:
    node = shutil.which("node")
    require(node is not None, "node is not installed")
    require((NODE_DIR / "node_modules" / "onnxruntime-node").is_dir(),
            "js/node/node_modules is missing (cd js/node && npm ci --ignore-scripts)")
    run = subprocess.run([node, str(NODE_DIR / "generate.mjs"), str(folder), "--token-ids", ",".join(map(str, prompt)),
                          "--max-new-tokens", str(max_new_tokens), "--json"], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, f"node failed ({run.returncode}): {run.stderr[-2000:]}"
    return json.loads(run.stdout)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_node_reproduces_greedy(cases, name):
    case = cases.get(name)
    result = node_greedy(case.folder, case.prompt, NEW_TOKENS)
    assert result["new_token_ids"] == case.expected, f"{name}: node {result['new_token_ids']} != ours {case.expected}"


def test_node_rejects_bad_token_ids(cases):
    node = shutil.which("node")
    require(node is not None and (NODE_DIR / "node_modules").is_dir(), "node or js/node/node_modules is missing")
    run = subprocess.run([node, str(NODE_DIR / "generate.mjs"), str(cases.root / "missing"), "--token-ids", "1,x"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert "expected comma-separated non-negative integers" in run.stderr
    run = subprocess.run([node, str(NODE_DIR / "generate.mjs"), str(cases.root / "missing"), "--token-ids", "1,2"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 1
    assert "is not a folder; expected an export folder" in run.stderr


# ---- the browser (onnxruntime-web, WASM, headless Chromium) ----------------------------------------


def test_web_page_in_headless_chromium(cases, tmp_path):
    node = shutil.which("node")
    require(node is not None, "node is not installed")
    require(Path(CHROMIUM).is_file(), f"chromium is not installed at {CHROMIUM} (apt-get install chromium)")
    require((WEB_DIR / "node_modules" / "onnxruntime-web").is_dir() and
            (WEB_DIR / "node_modules" / "playwright-core").is_dir(),
            "js/web/node_modules is missing (cd js/web && npm ci --ignore-scripts)")
    name = "default" if (DEFAULT_MODEL / "base").is_dir() else "gpt2"
    case = cases.get(name)
    sys.path.insert(0, str(WEB_DIR))
    try:
        import serve
    finally:
        sys.path.remove(str(WEB_DIR))
    server = serve.start(case.folder)
    try:
        port = server.server_address[1]
        url = (f"http://127.0.0.1:{port}/web/?autorun=1&ids={','.join(map(str, case.prompt))}"
               f"&tokens={NEW_TOKENS}")
        shot = tmp_path / "page.png"
        run = subprocess.run([node, str(WEB_DIR / "check.mjs"), url, str(shot), "--browser", CHROMIUM],
                             capture_output=True, text=True, timeout=300)
    finally:
        server.shutdown()
        server.server_close()
    assert run.returncode == 0, f"check.mjs failed: {run.stderr[-3000:]}"
    page = json.loads(run.stdout.strip().splitlines()[-1])
    assert page["status"] == "done", f"the page says {page['message']!r}; console: {page['console']}"
    got = [int(t) for t in page["tokens"].split()]
    assert got == case.expected, f"browser {got} != ours {case.expected}"
    # The screenshot is a real rendering of the page: a PNG with text on it, not a blank frame.
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, len(data)
    from PIL import Image

    with Image.open(shot) as image:
        gray = np.asarray(image.convert("L"))
    assert gray.shape[0] >= 600 and gray.shape[1] >= 900, gray.shape
    assert (gray < 128).mean() > 0.01, "the screenshot is almost blank"
