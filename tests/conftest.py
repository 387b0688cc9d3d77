"""Tiny local models and prefixes: nothing comes from a hub (HF_HUB_OFFLINE=1)."""
from __future__ import annotations

import builtins
import errno
import io
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from tiny_models import make_prefix, save_tiny_model, tiny_config  # noqa: E402


@pytest.fixture(autouse=True)
def _single_thread_torch():
    # CI has 2 cores; torch's own pool plus ORT's fight otherwise.
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="session")
def family(tmp_path_factory):
    """model_type -> (tiny model folder, trained P=5 prefix with its projection), made on first use and
    shared by every test that asks for the same family (test_compile, test_kv_buffer)."""
    made = {}

    def get(model_type):
        if model_type not in made:
            root = tmp_path_factory.mktemp(model_type)
            save_tiny_model(tiny_config(model_type), root / "model")
            made[model_type] = (root / "model", make_prefix(root / "model", root / "prefix", 5, projection=True,
                                                            trained=True))
        return made[model_type]

    return get


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory):
    """A tiny GPT-2 saved as a local model folder."""
    folder = tmp_path_factory.mktemp("gpt2")
    save_tiny_model(tiny_config("gpt2"), folder)
    return folder


@pytest.fixture(scope="session")
def gpt2_adapter(tmp_path_factory, gpt2_dir):
    """A trained PEFT adapter folder (projection on, P=4) for the tiny GPT-2."""
    folder = tmp_path_factory.mktemp("adapter")
    make_prefix(gpt2_dir, folder, num_virtual_tokens=4, projection=True, trained=True, kind="peft_adapter")
    return folder


def read_json(path):
    return json.loads(open(path).read())


# ---- runtime tests (generation, providers): one lively model, exported once in both layouts -------


@pytest.fixture(scope="session")
def lively_model(tmp_path_factory):
    """A tiny GPT-2 with large random weights, so greedy continuations vary instead of repeating."""
    folder = tmp_path_factory.mktemp("lively")
    save_tiny_model(tiny_config("gpt2", initializer_range=0.3), folder, seed=1)
    return folder


@pytest.fixture(scope="session")
def adapters(tmp_path_factory, lively_model):
    """Three PEFT adapters: A and B with P=4, C with P=2 (a shorter prefix for masking)."""
    root = tmp_path_factory.mktemp("adapters")
    return {name: make_prefix(lively_model, root / name, P, projection=True, trained=True, seed=seed)
            for name, P, seed in (("A", 4, 0), ("B", 4, 7), ("C", 2, 3))}


@pytest.fixture(scope="session")
def exports(tmp_path_factory, lively_model, adapters):
    """Adapter A exported twice: folded (library call) and cache layout (through the CLI)."""
    from prefix_export.api import export_prefix_model
    from prefix_export.cli import main as cli_main

    root = tmp_path_factory.mktemp("exports")
    folded = export_prefix_model(str(lively_model), adapters["A"], root / "folded", progress=False)
    assert folded.validation.passed, folded.validation.table()
    code = cli_main(["--model", str(lively_model), "--prefix", str(adapters["A"]), "--out", str(root / "cache"),
                     "--layout", "cache", "-q"])
    assert code == 0
    return {"folded": root / "folded", "cache": root / "cache"}


# ---- deploy targets: the embedded default and every registered decoder family, exported once ------


@pytest.fixture(scope="session")
def cases(tmp_path_factory):
    """test_deploy.Cases: export folders and our greedy tokens, shared by the deploy and C++ host tests."""
    from test_deploy import Cases

    return Cases(tmp_path_factory.mktemp("deploy"))


# ---- bad input: an empty output parent that must stay empty; files that cannot be opened ----------


@pytest.fixture
def out(tmp_path):
    parent = tmp_path / "outputs"
    parent.mkdir()
    return parent


@pytest.fixture
def deny_open(monkeypatch):
    """deny_open(path): opening `path` raises PermissionError, as for a mode-000 file and a non-root user."""
    denied: set[str] = set()
    real_open = builtins.open

    def guarded(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and os.path.abspath(os.fspath(file)) in denied:
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded)
    monkeypatch.setattr(io, "open", guarded)  # pathlib's read_text/open go through io.open
    return lambda path: denied.add(os.path.abspath(path))
