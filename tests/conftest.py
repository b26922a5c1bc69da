"""Shared fixtures: the tiny offline model is built once per test session (a few seconds, no network)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "data" / "samples"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from qed_lightning.tools.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny") / "model", preset="test", seed=0)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def samples_dir() -> Path:
    return SAMPLES
