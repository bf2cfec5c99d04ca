"""Fairness under abuse, through the real Gradio server: one client opening many sessions
cannot starve another client, its excess is refused at once with a wait estimate, and
votes never wait behind generation.

Clients are told apart by address; the app here trusts X-Forwarded-For from loopback
(``--trusted-proxies 127.0.0.1,::1``; the default trusts none), which is how these tests play
several clients.  The engine is slowed (a sleep per decode step, end-of-turn ignored) so the
flood's answers are still being written while the other client is served: the assertions are
about order and outcome, not about timings.
"""

from __future__ import annotations

import time

import pytest
from gradio_client import Client

from assistant.client import LOOPBACK_PROXIES, as_client
from tests.factories import app_settings, launch_app, wait_for

LONG = (0.7, 0.9, 400, -1)  # temperature, top_p, max_new_tokens, seed
SHORT = (0.7, 0.9, 4, -1)
STEP_S = 0.05  # 400 tokens take 20 s: far longer than the checks made meanwhile


@pytest.fixture
def fair_app(tmp_path, tiny_model_dir):
    settings = app_settings(tmp_path, tiny_model_dir, max_batch=4, max_new_tokens=400, client_max_streams=2,
                            client_max_waiting=2, max_waiting=8, trusted_proxies=LOOPBACK_PROXIES)
    url, ctx, close = launch_app(settings)
    _, engine = ctx.holder.current()
    engine.stop_ids = set()  # every answer runs to its max_new_tokens
    decode = engine.decoder.decode

    def slow(tokens):
        time.sleep(STEP_S)
        return decode(tokens)

    engine.decoder.decode = slow
    yield url, ctx, engine
    close()


def test_a_flooding_client_cannot_starve_another(fair_app):
    url, ctx, engine = fair_app
    flood = [Client(url, verbose=False, headers=as_client(0)) for _ in range(8)]  # 8 sessions, one client
    jobs = []
    for i, client in enumerate(flood):
        jobs.append(client.submit(f"flood {i}", "", *LONG, api_name="/chat"))
        if i == 1:  # the first two decoding before the rest arrive: the counts below are exact
            assert wait_for(lambda: engine.load == 2 and not len(engine.scheduler), 30)
    assert wait_for(lambda: sum(j.done() for j in jobs) >= 4, 30)  # the excess is refused at once
    refused = []
    for job in jobs:
        if job.done():
            with pytest.raises(Exception, match=r"You already have 2 answers waiting; try again in about \d+ s"):
                job.result()
            refused.append(job)
    assert len(refused) == 4 and len(engine.scheduler) == 2  # 2 decoding, 2 waiting, 4 refused

    # another client is served at once, and can regenerate and vote, while the flood goes on
    alice = Client(url, verbose=False, headers=as_client(1))
    history, _, _ = alice.predict("hello", "", *SHORT, api_name="/chat")
    assert history[-1]["role"] == "assistant"
    alice.predict(*SHORT, api_name="/regenerate")
    assert alice.predict("a", api_name="/vote")[1] == "Recorded: A is better."
    assert alice.predict(0, "up", [], "", api_name="/rate").startswith("Recorded")
    running = [j for j in jobs if j not in refused]
    assert not any(j.done() for j in running)  # all of that happened while the flood was writing
    for job in running:
        job.cancel()
    for client in flood:
        client.predict(api_name="/stop")


def test_votes_do_not_wait_behind_generation(fair_app):
    """With every decoding slot and the whole queue taken by long answers of many clients,
    a vote and a rating are answered while all of them are still being written."""
    url, ctx, engine = fair_app
    voter = Client(url, verbose=False, headers=as_client(99))
    voter.predict("first", "", *SHORT, api_name="/chat")
    voter.predict(*SHORT, api_name="/regenerate")
    clients = [Client(url, verbose=False, headers=as_client(10 + i)) for i in range(12)]
    jobs = [c.submit(f"long {i}", "", *LONG, api_name="/chat") for i, c in enumerate(clients[:4])]
    assert wait_for(lambda: engine.load == 4 and not len(engine.scheduler), 30)  # every slot decoding
    jobs += [c.submit(f"long {i}", "", *LONG, api_name="/chat") for i, c in enumerate(clients[4:])]
    assert wait_for(lambda: len(engine.scheduler) == 8, 30)  # and the whole queue waiting
    assert voter.predict("b", api_name="/vote")[1] == "Recorded: B is better."
    assert voter.predict(0, "down", ["too long"], "", api_name="/rate").startswith("Recorded")
    with pytest.raises(Exception, match=r"The assistant is busy; try again in about \d+ s"):
        voter.predict("one more", "", *SHORT, api_name="/chat")
    assert not any(j.done() for j in jobs)
    for c in clients:
        c.predict(api_name="/stop")
    assert ctx.store.db["comparisons"].count_where("verdict = 'b'") == 1
