"""Shared fixtures: a tiny random-weight model, the embedded model, a fresh store; and the
markers by folder.

Layout: ``unit/`` (functions and models in one process, no server), ``integration/`` (a real
SQLite file, a real Gradio server in-process), ``system/`` (processes, ``kill -9``, a real
browser, load).  Each test gets its folder's marker, so ``pytest -m unit`` runs the quick
ones and ``pytest -m "not system"`` everything but the slowest.  Builders the tests share
live in ``tests/factories.py``.

The tiny model uses the embedded model's real tokenizer and chat template (so every code
path sees real special tokens) with a 2-layer, 64-wide Llama body: fast enough for the whole
suite on two CPU cores, real enough to exercise loading, batching and training.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from assistant import models
from feedback.store import FeedbackStore
from tests.factories import build_tiny_model

CACHE = Path(os.environ.get("ASSISTANT_TEST_CACHE", Path.home() / ".cache" / "rlhf-assistant-tests"))


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    """The embedded model's tokenizer, saved once as a plain HF tokenizer directory."""
    target = CACHE / "tokenizer"
    if not (target / "tokenizer_config.json").exists():
        from transformers import AutoTokenizer

        gguf = models.embedded_gguf_path()
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        target.mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(target)
    return target


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"), tokenizer_dir)


@pytest.fixture(scope="session")
def embedded_model_dir() -> Path:
    """The real SmolLM2-135M-Instruct, converted once and cached across test runs."""
    return models.convert_embedded(CACHE / "models")


@pytest.fixture
def store(tmp_path) -> FeedbackStore:
    s = FeedbackStore(tmp_path / "feedback.sqlite")
    yield s
    s.close()


LAYERS = ("unit", "integration", "system")


def pytest_collection_modifyitems(config, items):
    """Marks every test with the layer its folder names."""
    for item in items:
        layer = next((part for part in Path(str(item.path)).parts if part in LAYERS), None)
        if layer:
            item.add_marker(getattr(pytest.mark, layer))
