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
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
import torch

from prefix_export.source import architectures
from prefix_export.api import export_prefix_model
from prefix_export.deploy.genai import GENAI_CONFIG_FILE, context_length
from prefix_export.folder import read_prefix_file
from prefix_export.runtime.decoder import OnnxDecoder
from prefix_export.runtime.loop import greedy_generate
from prefix_export.runtime.sessions import create_session
from prefix_export.validate.report import Tolerances
from tests_helpers import genai_greedy
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
TEXT = "name: Aromi | food: Chinese | area: city centre =>"
TOKENIZER_VOCAB = 300  # the tiny models get this vocabulary and a byte-level BPE tokenizer trained on TEXT
MIN_DISTINCT = 4  # different tokens the tiny models' greedy output must show (see _tiny_varied_case)
# Every registered family when PREFIX_EXPORT_DEPLOY_FAMILIES=all (CI sets it: one export each, ~10-50 s
# on 2 cores); otherwise a representative few: learned positions + MHA, GQA + rotary, an explicit
# head_dim, ALiBi. A comma-separated list picks others.
REPRESENTATIVE = ("gpt2", "llama", "qwen3", "bloom")


def _families() -> list[str]:
    """Decoder-only families: these runtimes take one causal-LM graph (seq2seq exports have two)."""
    registered = [t for t in architectures.supported_model_types()
                  if t in TINY_CONFIGS and not architectures.describe(tiny_config(t)).is_seq2seq]
    chosen = os.environ.get("PREFIX_EXPORT_DEPLOY_FAMILIES", "").strip()
    if chosen == "all":
        return registered
    if chosen:
        return [f.strip() for f in chosen.split(",") if f.strip()]  # a typo fails in Cases._make
    return [f for f in REPRESENTATIVE if f in registered]


FAMILIES = _families()


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
    text: str | None  # `expected` decoded by the folder's tokenizer with transformers (None: no tokenizer)
    model: Path  # the model and prefix exported, to export them again in another layout
    prefix: Path


def _tiny_varied_case(model_type: str, model_dir: Path, prefix_dir: Path) -> None:
    """A tiny model and prefix whose prefix-tuned greedy output varies, saved to model_dir/prefix_dir.

    Default initialisations make tiny models repeat one token, and a comparison of sixteen equal
    tokens proves little (a wrong position would go unseen). Weights are redrawn with a few seeds and
    scales until PEFT's greedy output (forward only, cheap) shows at least MIN_DISTINCT tokens.
    Embeddings are untied: with large tied embeddings, some families (gemma2) echo the last token.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, vocab_size=TOKENIZER_VOCAB,
                                                               tie_word_embeddings=False)).eval()
    prompt = torch.tensor([PROMPT])
    for seed, scale in [(1, 0.5), (2, 1.0), (3, 0.3), (4, 0.7), (5, 0.5), (6, 1.0), (7, 0.3), (8, 0.7)]:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param in model.parameters():
                if param.ndim >= 2:  # matrices and embeddings; norms and biases keep their init
                    param.copy_(torch.randn(param.shape, generator=generator) * scale)
        shutil.rmtree(model_dir, ignore_errors=True)
        shutil.rmtree(prefix_dir, ignore_errors=True)
        model.save_pretrained(model_dir)
        make_prefix(model_dir, prefix_dir, NUM_VIRTUAL_TOKENS, projection=True, trained=True)
        base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        with torch.no_grad():
            tokens = _hf_greedy(PeftModel.from_pretrained(base, prefix_dir).eval(), prompt, NEW_TOKENS)
        if len(set(tokens)) >= MIN_DISTINCT:
            return


def _save_tiny_tokenizer(folder: Path) -> None:
    """A byte-level BPE tokenizer (GPT-2 style) trained here on a few sentences: <pad>=0, <s>=1, </s>=2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<pad>", "<s>", "</s>"], show_progress=False)
    corpus = [TEXT + " Aromi is a Chinese restaurant in the city centre.", "café naïve 東京 — the end"] * 10
    tokenizer.train_from_iterator(corpus, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(folder)


def _hf_greedy(model, prompt: torch.Tensor, steps: int) -> list[int]:
    tokens = prompt
    for _ in range(steps):
        next_token = model(input_ids=tokens).logits[0, -1].argmax()
        tokens = torch.cat([tokens, next_token.view(1, 1)], dim=1)
    return tokens[0, prompt.shape[1]:].tolist()


def _eos(folder: Path):
    for name in ("generation_config.json", "config.json"):
        path = folder / name
        if path.is_file():
            value = json.loads(path.read_text()).get("eos_token_id")
            if value is not None:
                return value
    return None


def _build_case(name: str, model_dir: Path, prefix: Path, out: Path, prompt: list[int],
                layout: str = "folded") -> Case:
    # atol 1e-3: the tiny weights are drawn large (see _tiny_varied_case), so logits reach ~10-100 and
    # float32 rounding alone exceeds the default 1e-4; the tokens compared below are exact.
    result = export_prefix_model(str(model_dir), prefix, out, progress=False, layout=layout,
                                 tolerances=None if name == "default" else Tolerances(atol=1e-3))
    assert result.validation.passed, result.validation.table()
    eos = _eos(out)
    decoder = OnnxDecoder(create_session(result.graph), read_prefix_file(out) if layout == "cache" else None)
    first_eos = eos[0] if isinstance(eos, list) else eos  # greedy_generate takes one id
    new = greedy_generate(decoder, np.array([prompt]), np.ones((1, len(prompt)), np.int64), NEW_TOKENS,
                          first_eos)[0].tolist()
    expected = _until_eos(new, eos)
    text = None
    if (out / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        text = AutoTokenizer.from_pretrained(str(out)).decode(expected, skip_special_tokens=True)
    return Case(name, out, prompt, expected, eos, text, Path(model_dir), Path(prefix))


def _until_eos(tokens: list[int], eos) -> list[int]:
    ends = set(eos if isinstance(eos, list) else [eos]) - {None}
    for i, token in enumerate(tokens):
        if token in ends:
            return tokens[: i + 1]
    return tokens


class Cases:
    """Export folders made on first use and kept for the session (the `cases` fixture, conftest.py).
    Folded by default; `layout="cache"` exports the folded case's model and prefix again."""

    def __init__(self, root: Path):
        self.root = root
        self.cases: dict[tuple[str, str], Case] = {}

    def get(self, name: str, layout: str = "folded") -> Case:
        if (name, layout) not in self.cases:
            self.cases[name, layout] = self._make(name, layout)
        return self.cases[name, layout]

    def _make(self, name: str, layout: str) -> Case:
        folder = self.root / name
        if layout != "folded":
            case = self.get(name)
            return _build_case(name, case.model, case.prefix, folder / layout, case.prompt, layout)
        if name == "default":
            require((DEFAULT_MODEL / "base").is_dir() and (DEFAULT_MODEL / "prefix").is_dir(),
                    f"the embedded default model is not in {DEFAULT_MODEL} yet")
            from transformers import AutoTokenizer

            prompt = AutoTokenizer.from_pretrained(str(DEFAULT_MODEL / "base"))(TEXT)["input_ids"]
            return _build_case(name, DEFAULT_MODEL / "base", DEFAULT_MODEL / "prefix", folder / "out", prompt)
        assert name in TINY_CONFIGS, f"{name} is registered but has no tiny config in tools/tiny_models.py"
        _tiny_varied_case(name, folder / "model", folder / "prefix")
        _save_tiny_tokenizer(folder / "model")
        return _build_case(name, folder / "model", folder / "prefix", folder / "out", PROMPT)


CASE_NAMES = ["default", *FAMILIES]


# ---- onnxruntime-genai ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", CASE_NAMES)
def test_genai_reproduces_greedy(cases, name):
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        require(False, "onnxruntime-genai is not installed (pip install 'prefix-export[deploy]')")
    case = cases.get(name)
    got = genai_greedy(case.folder, case.prompt, NEW_TOKENS)
    assert got == case.expected, f"{name}: genai {got} != ours {case.expected}"


@pytest.mark.parametrize("name", ["default", "gpt2"])
def test_genai_tokenizer_reads_the_folder(cases, name):
    """genai's own tokenizer (onnxruntime-extensions) reads the tokenizer files the export copied."""
    try:
        import onnxruntime_genai as og
    except ImportError:
        require(False, "onnxruntime-genai is not installed (pip install 'prefix-export[deploy]')")
    from transformers import AutoTokenizer

    case = cases.get(name)
    require(case.text is not None, f"{name}: the export has no tokenizer.json")
    reference = AutoTokenizer.from_pretrained(str(case.folder))
    tokenizer = og.Tokenizer(og.Model(str(case.folder)))
    ids = reference(TEXT)["input_ids"]
    assert tokenizer.encode(TEXT).tolist() == ids
    assert tokenizer.decode(np.array(ids, dtype=np.int32)) == reference.decode(ids, skip_special_tokens=True)
    if "\ufffd" not in case.text:  # random tokens can be broken UTF-8, which genai drops and transformers replaces
        assert tokenizer.decode(np.array(case.expected, dtype=np.int32)) == case.text


@pytest.mark.parametrize("name", FAMILIES)
def test_tiny_cases_are_informative(cases, name):
    """Sixteen equal tokens would let a runtime's wrong positions go unseen: the cases must vary."""
    expected = cases.get(name).expected
    assert len(set(expected)) >= 3 or len(expected) < NEW_TOKENS, f"{name}: greedy output barely varies: {expected}"


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

# optimum-onnx 0.1.0 builds the first, empty cache from config.json with rules per model type
# (optimum/onnxruntime/modeling_decoder.py), not from the graph's input shapes. Where its rules differ
# from the cache transformers 5.24 builds, ONNX Runtime rejects the first step with "Got invalid
# dimensions". The folders are fine: genai, Node and our own loop run them. A fixed optimum makes the
# test fail, so this list cannot go stale.
OPTIMUM_UNSUPPORTED = {
    "falcon": "new_decoder_architecture: optimum feeds num_kv_heads heads; transformers caches K/V broadcast "
              "to num_attention_heads",
    "gemma2": "optimum ignores num_key_value_heads for gemma2 (feeds num_attention_heads), so GQA models fail",
    "phi3": "optimum ignores num_key_value_heads for phi3 (feeds num_attention_heads), so GQA models "
            "(phi-3-medium style; the tiny config has 2 KV heads) fail",
    "qwen3": "optimum takes head_dim = hidden_size / num_attention_heads and ignores qwen3's explicit head_dim",
}


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
    if name in OPTIMUM_UNSUPPORTED:
        assert "Got invalid dimensions for input: past_key_values" in result.get("error", ""), \
            f"{name}: optimum now runs this family ({result}); remove it from OPTIMUM_UNSUPPORTED"
        pytest.xfail(f"optimum-onnx limitation: {OPTIMUM_UNSUPPORTED[name]}")
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
    assert result["text"] == case.text, f"{name}: js/tokenizer.mjs decoded {result['text']!r}, transformers {case.text!r}"


@pytest.mark.parametrize("name", ["default", "gpt2"])
def test_node_encodes_text_prompts_like_transformers(cases, name):
    """js/tokenizer.mjs's byte-level BPE gives transformers' ids, so `--prompt TEXT` means the same prompt."""
    from transformers import AutoTokenizer

    case = cases.get(name)
    node = shutil.which("node")
    require(node is not None and (NODE_DIR / "node_modules").is_dir(), "node or js/node/node_modules is missing")
    reference = AutoTokenizer.from_pretrained(str(case.folder))
    for text in (TEXT, "Hello  world!\n\nIt's 2024 \u2014 caf\u00e9 \u6771\u4eac ok   ", " a"):
        run = subprocess.run([node, str(NODE_DIR / "generate.mjs"), str(case.folder), "--prompt", text,
                              "--max-new-tokens", str(NEW_TOKENS), "--json"], capture_output=True, text=True,
                             timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        result = json.loads(run.stdout)
        assert result["prompt_token_ids"] == reference(text)["input_ids"], text
    if name == "default":  # the default's case prompt is TEXT's ids, so the tokens are ours too
        assert case.prompt == reference(TEXT)["input_ids"]
        first = subprocess.run([node, str(NODE_DIR / "generate.mjs"), str(case.folder), "--prompt", TEXT,
                                "--max-new-tokens", str(NEW_TOKENS), "--json"], capture_output=True, text=True,
                               timeout=300)
        assert json.loads(first.stdout)["new_token_ids"] == case.expected


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
    run = subprocess.run([node, str(NODE_DIR / "generate.mjs"), str(cases.root), "--prompt", "a", "--token-ids", "1"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert "give --prompt TEXT or --token-ids 1,2,3 (one of them)" in run.stderr


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
        # The default's prompt is TEXT: the page encodes it itself; tiny models get ids.
        prompt = (f"text={urllib.parse.quote(TEXT)}" if name == "default"
                  else f"ids={','.join(map(str, case.prompt))}")
        url = f"http://127.0.0.1:{port}/web/?autorun=1&{prompt}&tokens={NEW_TOKENS}"
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
    if case.text is not None:
        assert page["text"] == case.text
    # The screenshot is a real rendering of the page: a PNG with text on it, not a blank frame.
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, len(data)
    from PIL import Image

    with Image.open(shot) as image:
        gray = np.asarray(image.convert("L"))
    assert gray.shape[0] >= 600 and gray.shape[1] >= 900, gray.shape
    assert (gray < 128).mean() > 0.01, "the screenshot is almost blank"
