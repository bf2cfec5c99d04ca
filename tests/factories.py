"""Builders the tests share: one place, so test modules never import from each other.

- ``launch_app`` / ``app_settings`` / ``wait_for``: the whole app (store, engine, Gradio
  server) on a free local port, without blocking;
- ``build_tiny_model``: a 2-layer random-weight Llama with the embedded model's tokenizer;
- ``populate`` / ``RawConsole`` / ``PASSWORD``: console data and the browser's raw HTTP calls;
- ``seed_votes`` / ``write_config`` / ``TINY``: judgements and a tiny retrain config;
- ``separable_pairs``: a trivially learnable preference for reward-model tests.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import torch

from assistant.client import free_port
from assistant.context import AppContext
from assistant.settings import Settings
from feedback.store import FeedbackStore
from retrain.data import Pair

SYS = {"role": "system", "content": "You are a helpful AI assistant."}


def app_settings(data_dir: Path | str, model: Path | str, **changes) -> Settings:
    """Settings for a test app: its own data directory, no scheduled retrain, loopback.  No
    rate limits: every test client comes from 127.0.0.1, so they would all share one budget
    (the limits have their own apps in test_hostile.py)."""
    base = Settings(data_dir=str(data_dir), model=str(model), host="127.0.0.1", retrain_enabled=False,
                    max_new_tokens=16, threads=1, max_batch=4, rate_messages_per_minute=0, rate_votes_per_minute=0)
    return base.replace(**changes)


def launch_app(settings: Settings, *, with_scheduler: bool = False) -> tuple[str, AppContext, Callable[[], None]]:
    """Builds the whole app like ``app.py`` does and serves it on a free port without
    blocking.  Returns (url, ctx, close); ``close`` stops the server, the engine and the store."""
    import app
    from assistant import ui

    chosen = settings.port in (0, 7860)
    for attempt in range(3):
        settings = settings.replace(port=free_port() if chosen else settings.port)
        ctx = app.create_context(settings)
        try:
            if with_scheduler:
                app.start_scheduler(ctx)
            demo = ui.build_app(ctx)
            _, url, _ = ui.launch(demo, ctx, prevent_thread_lock=True, quiet=True)
            break
        except OSError as exc:
            app.close_context(ctx)
            # the free port was taken meanwhile (another test process chose it too): pick another
            if not (chosen and attempt < 2 and "Cannot find empty port" in str(exc)):
                raise
        except BaseException:
            app.close_context(ctx)
            raise

    def close() -> None:
        try:
            demo.close()
        finally:
            app.close_context(ctx)

    return url, ctx, close


def wait_for(predicate: Callable[[], bool], timeout_s: float = 10, interval_s: float = 0.05) -> bool:
    """Polls until ``predicate()`` holds (another process's writes, a swap); False on timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return predicate()

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


PASSWORD = "console-test-pw"


def populate(store, registry, model_path: str) -> dict:
    """A few judgements through the store API: two versions, comparisons, an edit, ratings."""
    from retrain.versions import publish

    if Path(model_path).is_dir():  # a version the console may serve is a published one, with its manifest
        model_path = str(publish(model_path, store.path.parent / "versions", "v2"))
    registry.register_version(version_id="v2", path=model_path, kind="ppo", parent_id="sft", note="test")
    ids: dict[str, str] = {}
    store.ensure_session("sess-alice", user="alice")
    store.ensure_session("sess-bob", user="bob")
    for n, (sid, question) in enumerate([("sess-alice", "What is the capital of France?"),
                                         ("sess-bob", "Write a haiku about rain"),
                                         ("sess-alice", "Explain recursion briefly")]):
        conv = store.start_conversation(sid, "You are a helpful AI assistant.")
        ctx = [{"role": "system", "content": "You are a helpful AI assistant."}, {"role": "user", "content": question}]
        store.set_message(conv, 1, "user", question)
        ga = store.record_generation(session_id=sid, conversation_id=conv, turn=2, context=ctx,
                                     content=f"answer A{n}", model_version="sft",
                                     sampling={"temperature": 0.7, "top_p": 0.9, "seed": n}, prompt_tokens=20,
                                     completion_tokens=8, ttft_ms=12.0, latency_ms=80.0, finish_reason="stop")
        gb = store.record_generation(session_id=sid, conversation_id=conv, turn=2, context=ctx,
                                     content=f"answer B{n}", model_version="v2",
                                     sampling={"temperature": 0.7, "top_p": 0.9, "seed": n + 10}, prompt_tokens=20,
                                     completion_tokens=9, ttft_ms=11.0, latency_ms=70.0, finish_reason="stop")
        comp = store.open_comparison(session_id=sid, conversation_id=conv, turn=2, a_generation_id=ga,
                                     b_generation_id=gb)
        store.decide_comparison(comp, ["b", "a", "both_bad"][n], sid)
        ids[f"comparison{n}"] = comp
        ids[f"rating{n}"] = store.record_rating(session_id=sid, generation_id=ga, thumb=["down", "up", "down"][n],
                                                reasons=[["inaccurate"], [], ["too long"]][n],
                                                comment=["wrong city", "", ""][n])
        if n == 1:
            ids["edit"] = store.record_edit(session_id=sid, conversation_id=conv, turn=2, generation_id=ga,
                                            rewrite="Rain on the window")
    return ids


class RawConsole:
    """What the browser does: POSTs to the private endpoints with one session hash."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.session_hash = uuid.uuid4().hex
        self.http = httpx.Client(timeout=60)
        cfg = self.http.get(self.url + "/config").json()
        states = {c["id"] for c in cfg["components"] if c.get("type") == "state"}
        self.inputs = {d["api_name"]: [i in states for i in d["inputs"]] for d in cfg["dependencies"]}

    def call(self, name: str, *data) -> tuple[bool, list | str]:
        """``data``: the values of the non-State inputs; State inputs are sent as null, as the
        browser does (the server keeps their values per session)."""
        values = iter(data)
        full = [None if is_state else next(values) for is_state in self.inputs[f"console_{name}"]]
        r = self.http.post(f"{self.url}/gradio_api/run/console_{name}",
                           json={"data": full, "session_hash": self.session_hash})
        body = r.json()
        if r.status_code == 200 and "data" in body:
            return True, body["data"]
        return False, str(body.get("error") or body)

    def ok(self, name: str, *data) -> list:
        ok, out = self.call(name, *data)
        assert ok, f"{name} failed: {out}"
        return out


TINY = {
    "reward": {"epochs": 1, "batch_size": 8, "max_length": 96, "train_layers": 2},
    "ppo": {"steps": 2, "batch_size": 4, "minibatch_size": 4, "ppo_epochs": 1, "max_new_tokens": 8,
            "lora_layers": 2},
    "gate": {"min_rm_accuracy": 0.0, "min_rm_ci_low": 0.0, "max_rm_drop": 1.0, "kl_budget": 1e9,
             "min_win_ci_low": -1.0, "max_eos_drop": 1.0, "max_entropy_drop": 1.0, "min_length_ratio": 0.0,
             "max_empty_increase": 1.0, "max_duplicate_increase": 1.0, "max_repetition_increase": 1.0,
             "max_new_tokens": 8, "max_prompts": 4, "batch_size": 4},
}


def seed_votes(store: FeedbackStore, n: int, sessions: int = 4, verdict=lambda i: "b") -> list[str]:
    """n decided comparisons over a few sessions: the short answer (b) wins, unless
    ``verdict(i)`` says otherwise."""
    ids = []
    for i in range(n):
        sid = f"session-{i % sessions}"
        conv = store.start_conversation(sid, "You are a helpful AI assistant.")
        context = [{"role": "system", "content": "You are a helpful AI assistant."},
                   {"role": "user", "content": f"Question number {i}: what is {i} plus {i}?"}]
        common = dict(session_id=sid, conversation_id=conv, turn=1, context=context, model_version="sft",
                      sampling={"temperature": 0.7}, prompt_tokens=20, completion_tokens=5, ttft_ms=1.0,
                      latency_ms=2.0, finish_reason="stop")
        long = store.record_generation(content=f"Well, let me think at length about {i} and {i}. " * 3, **common)
        short = store.record_generation(content=f"{2 * i}.", **common)
        cid = store.open_comparison(session_id=sid, conversation_id=conv, turn=1, a_generation_id=long,
                                    b_generation_id=short)
        store.decide_comparison(cid, verdict(i), sid)
        ids.append(cid)
    return ids


def write_config(path: Path, **changes) -> None:
    config = json.loads(json.dumps(TINY))
    for section, values in changes.items():
        config[section].update(values)
    path.write_text(json.dumps(config))


def separable_pairs(n, offset=0):
    out = []
    for i in range(n):
        prompt = [SYS, {"role": "user", "content": f"Tell me about thing {i + offset}."}]
        out.append(Pair(f"p{i + offset}", f"s{i % 3}", f"2024-01-01T00:00:{i:02d}", prompt,
                        "Sure.", "No no no no no no no no no no no no.", "regenerate"))
    return out


def tiny_reward_model(model_dir: Path, out: Path) -> Path:
    """A reward model on ``model_dir`` trained one epoch on separable pairs, saved at ``out``
    (what PPO tests optimise against)."""
    from retrain.reward import RewardConfig, new_reward_model, train_reward_model

    rcfg = RewardConfig(train_layers=1, epochs=1, batch_size=4)
    rm = new_reward_model(str(model_dir), rcfg, None, "cpu")
    train_reward_model(rm, separable_pairs(8), [], rcfg)
    rm.save(str(out))
    return out
