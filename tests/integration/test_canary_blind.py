"""The live canary against a real server: blind before the vote, and not decided by one
client.  A candidate (the tiny model published as ``v-cand``) is put on trial with every
answer B from it (share 1.0); simulated users are clients of their own by address
(``as_client``, with the app trusting loopback as their proxy)."""

from __future__ import annotations

import re

import pytest
from gradio_client import Client

from assistant.client import LOOPBACK_PROXIES, as_client
from retrain import versions
from retrain.canary import CanaryConfig, status
from tests.factories import app_settings, launch_app, wait_for

SYSTEM = "You are a test assistant."


@pytest.fixture
def trial(tmp_path, tiny_model_dir):
    settings = app_settings(tmp_path, tiny_model_dir, canary_share=1.0, canary_min_votes=4, canary_min_clients=3,
                            canary_max_votes_per_client=2, trusted_proxies=LOOPBACK_PROXIES, max_new_tokens=8)
    url, ctx, close = launch_app(settings, with_scheduler=True)  # the canary's watcher decides
    registry = ctx.registry
    path = versions.publish(tiny_model_dir, settings.versions_dir, "v-cand")
    registry.register_version(version_id="v-cand", path=str(path), kind="ppo", parent_id="sft")
    run = registry.create_run("test")
    registry.start_canary(run_id=run, version_id="v-cand", parent_id="sft")
    assert wait_for(lambda: ctx.holder.canary_version == "v-cand", 60)
    yield url, ctx, run
    close()


def _round(client: Client, i: int, verdict: str, store) -> None:
    """Chat, regenerate (B is the candidate's) and vote; the version is hidden until the vote."""
    _, version, _ = client.predict(f"question {i}", SYSTEM, 0.7, 0.9, 8, i, api_name="/chat")
    assert version == "Answering: **the original assistant** (`sft`)"  # no trial in a plain answer: it is the served one
    a, b, version, note = client.predict(0.9, 0.9, 8, 100 + i, api_name="/regenerate")
    assert version == "" and "v-cand" not in note and "sft" not in note  # blind: nothing says who wrote B
    b_gen = store.query("SELECT g.model_version FROM comparisons c JOIN generations g ON g.id = c.b_generation_id "
                        "ORDER BY c.rowid DESC LIMIT 1")[0]
    assert b_gen["model_version"] == "v-cand"  # ... and the candidate did
    client.predict(verdict, api_name="/vote")


@pytest.mark.timeout(600)
def test_one_flooding_client_cannot_decide_the_canary_the_others_do(trial):
    url, ctx, run = trial
    cfg = CanaryConfig.from_settings(ctx.settings)
    flood = Client(url, verbose=False, headers=as_client(1))
    for i in range(8):  # one client, eight votes for the candidate
        _round(flood, i, "b", ctx.store)
    standing = status(ctx.registry, cfg)
    assert (standing.wins, standing.capped, standing.clients, standing.action) == (2, 6, 1, "continue")
    assert ctx.registry.run(run)["status"] == "canary" and ctx.holder.canary_version == "v-cand"
    for n in range(2, 6):  # four other users prefer what is served, twice each
        user = Client(url, verbose=False, headers=as_client(n))
        for k in range(2):
            _round(user, 10 * n + k, "a", ctx.store)
    assert wait_for(lambda: ctx.registry.run(run)["status"] == "rejected", 30)
    reason = ctx.registry.run(run)["reason"]
    # the watcher decides at 2 of 9 (upper bound under 50%) or, if it looks a vote later, of 10
    assert re.search(r"2 of (9|10) decisive votes from 5 clients", reason), reason
    assert "6 more past 2 per client not counted" in reason
    assert ctx.registry.served_version() == "sft"
