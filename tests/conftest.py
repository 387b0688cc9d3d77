"""Tiny local models and prefixes: nothing comes from a hub (HF_HUB_OFFLINE=1)."""
from __future__ import annotations

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
