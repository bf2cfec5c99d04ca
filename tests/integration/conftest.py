"""Fixtures the chat service's integration tests share (a module may define its own)."""

from __future__ import annotations

import pytest

from assistant.chat import ChatService
from assistant.engine import Engine
from assistant.holder import ModelHolder
from assistant.models import load
from assistant.settings import Settings
from feedback.store import FeedbackStore


@pytest.fixture(scope="module")
def holder(tiny_model_dir, tmp_path_factory):
    """The tiny model served as version ``v-test`` (one engine per test module)."""
    loaded = load(str(tiny_model_dir), tmp_path_factory.mktemp("models"))
    engine = Engine(loaded.model, loaded.tokenizer, max_batch=2, max_context=512)
    yield ModelHolder(engine, "v-test")
    engine.close()


@pytest.fixture
def service(holder, tmp_path):
    """A chat service on a fresh SQLite file, served by ``holder``."""
    store = FeedbackStore(tmp_path / "feedback.sqlite")
    yield ChatService(Settings(max_message_chars=2000), store, holder)
    store.close()
