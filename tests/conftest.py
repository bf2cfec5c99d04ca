"""Shared fixtures: a tiny random-weight model, the embedded model, a fresh store.

The tiny model uses the embedded model's real tokenizer and chat template (so every code
path sees real special tokens) with a 2-layer, 64-wide Llama body: fast enough for the whole
suite on two CPU cores, real enough to exercise loading, batching and training.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from assistant import models
from feedback.store import FeedbackStore

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


def build_tiny_model(path: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


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
