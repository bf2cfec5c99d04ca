"""The learning benchmark's pure parts: oracles, the held-out leak checks, the win-rate helpers
and the report (no model, no app)."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from benchmarks import learning, oracles
from benchmarks.leakcheck import (
    THRESHOLD,
    check_run_prompts,
    leaked_prompts,
    near_duplicates,
    normalise,
    similarity,
)
from retrain.data import load_seed_prompts

P = [{"role": "user", "content": "question"}]


def words(n: int, word: str = "word") -> str:
    return " ".join([word] * n)


# -- oracles ---------------------------------------------------------------------------------------

def test_registry_has_every_oracle():
    assert set(oracles.ORACLES) == {"concise", "verbose", "no_lists", "lists", "no_first_person", "no_markdown",
                                    "question_back", "plain_words", "on_topic", "no_hedging", "short_sentences",
                                    "random"}
    assert oracles.get("random") is oracles.random_verdict
    assert oracles.get("benchmarks.oracles:lists") is oracles.lists


def test_tastes_of_other_kinds_judge_what_they_say_and_are_length_neutral():
    q = [{"role": "user", "content": "How do bicycles stay upright?"}]
    assert oracles.plain_words(q, "I use a cat.", "I utilise felines.") == "a"
    assert oracles.plain_words(q, "I use a cat.", "I use a cat. I use a cat.") == "tie"
    assert oracles.on_topic(q, "Cats are nice animals.", "Bicycles stay upright by steering.") == "b"
    assert oracles.no_hedging(q, "It is blue.", "It might be blue.") == "a"
    assert oracles.no_hedging(q, "It might be blue.", "It might be blue. It might be blue.") == "tie"
    assert oracles.short_sentences(q, "Yes. No. Go.", "This one sentence has many words in it.") == "a"
    assert oracles.short_sentences(q, "Yes. No.", "Yes. No. Yes. No.") == "tie"
    for taste in (oracles.plain_words, oracles.on_topic, oracles.no_hedging, oracles.short_sentences):
        assert taste(q, "", "Bicycles stay upright.") == "b"  # an empty answer never wins


def test_the_tastes_written_after_the_design_was_frozen():
    from benchmarks import unseen_tastes as u
    q = [{"role": "user", "content": "How do bicycles stay upright?"}]
    assert oracles.get("benchmarks.unseen_tastes:fewer_the") is u.fewer_the  # as the benchmark loads them
    assert u.fewer_the(q, "Wheels spin fast.", "The wheels spin at a high speed.") == "a"
    assert u.fewer_commas(q, "Wheels spin, turn, and steer.", "Wheels spin and steer.") == "b"
    assert u.fewer_commas(q, "Wheels spin, fast.", "Wheels spin, fast. Wheels spin, fast.") == "tie"  # per word
    assert u.fewer_the(q, "The wheel spins.", "The wheel spins.") == "tie"
    assert u.fancy_words(q, "I use a cat.", "I utilise felines.") == "b"  # plain_words reversed
    assert u.fancy_words(q, "I use a cat.", "I use a cat. I use a cat.") == "tie"
    for taste in (u.fewer_the, u.fewer_commas, u.fancy_words):
        assert taste(q, "", "Bicycles stay upright.") == "b"  # an empty answer never wins


def test_length_oracles_unchanged():
    assert oracles.concise(P, words(10), words(20)) == "a"
    assert oracles.concise(P, words(10), words(11)) == "tie"
    assert oracles.concise(P, "", words(5)) == "b"
    assert oracles.verbose(P, words(10), words(20)) == "b"
    assert oracles.no_lists(P, "- x\n- y", "prose") == "b"


def test_lists():
    three = "Tips:\n- one\n- two\n* three"
    one = "Tips:\n1. one thing and then prose"
    assert oracles.lists(P, three, one) == "a"
    assert oracles.lists(P, one, three) == "b"
    assert oracles.lists(P, "1) x\n2) y", "- x\n- y") == "tie"  # numbered and bulleted count alike
    assert oracles.lists(P, "plain prose", "other prose") == "tie"
    assert oracles.lists(P, "", "- x") == "b"
    # the exact opposite of no_lists whenever no_lists decides
    for a, b in [(three, one), (one, "prose"), ("prose", three)]:
        assert {oracles.lists(P, a, b), oracles.no_lists(P, a, b)} == {"a", "b"}


def test_no_first_person():
    assert oracles.no_first_person(P, "I think the sky is blue.", "The sky is blue.") == "b"
    assert oracles.no_first_person(P, "The sky is blue.", "In my view it's blue.") == "a"
    assert oracles.no_first_person(P, "The sky is blue.", "It is blue.") == "tie"  # none in either
    # contractions and curly apostrophes count; "Iodine" and "Imagine" do not
    assert oracles._first_person("I'm sure I’ll help me; Iodine. Imagine") == 3
    # per word: 1 in 10 words loses to 2 in 40 words
    a = "I " + words(9)
    b = "I me " + words(38)
    assert oracles.no_first_person(P, a, b) == "b"
    # equal counts tie whatever the lengths (else the longer answer would win)
    assert oracles.no_first_person(P, "I agree.", "I " + words(50)) == "tie"
    # length-neutral: an answer against itself written twice ties
    x = "I guess my answer is " + words(6)
    assert oracles.no_first_person(P, x, x + " " + x) == "tie"
    # an empty answer never wins
    assert oracles.no_first_person(P, "", "I am here.") == "b"
    assert oracles.no_first_person(P, "I am here.", "  ") == "a"


def test_no_markdown():
    assert oracles.no_markdown(P, "**Blue** is a colour.", "Blue is a colour.") == "b"
    assert oracles.no_markdown(P, "Run it.", "# Title\nRun `ls`, see [docs](http://x).") == "a"
    assert oracles._markdown_marks("# Title\n**b** *i* `c` [l](u)\n> q\n| a | b |\n```\nx\n```") == 9
    # list markers and arithmetic are not markdown emphasis
    assert oracles._markdown_marks("* one\n* two\n- three\n2*3*4 = 24") == 0
    assert oracles.no_markdown(P, "- one\n- two", "one two") == "tie"
    # per word and length-neutral
    x = "**Note**: " + words(9)
    assert oracles.no_markdown(P, x, x + "\n" + x) == "tie"
    assert oracles.no_markdown(P, "**a** " + words(9), "**a** **b** " + words(38)) == "b"
    assert oracles.no_markdown(P, "", "**x**") == "b"


def test_question_back():
    assert oracles.question_back(P, "Blue. Want to know why?", "Blue.") == "a"
    assert oracles.question_back(P, "Blue.", "Blue. Shall I go on? ") == "b"
    assert oracles.question_back(P, 'Would you like more?"', "Ok.") == "a"  # closing quote
    assert oracles.question_back(P, "Why? Because.", "Blue.") == "tie"  # only the end counts
    assert oracles.question_back(P, "Any more?", "Something else?") == "tie"
    assert oracles.question_back(P, "No.", "Fine.") == "tie"
    # not about length: the question wins whether it is the shorter or the longer answer
    assert oracles.question_back(P, words(80) + ".", "More?") == "b"
    assert oracles.question_back(P, words(80) + "?", "Done.") == "a"
    assert oracles.question_back(P, "", "No.") == "b"


def test_random_is_reproducible_and_uniform():
    oracles.reseed_random(7)
    first = [oracles.random_verdict(P, "a", "b") for _ in range(50)]
    oracles.reseed_random(7)
    # the answers are ignored: other answers, the same draws
    second = [oracles.random_verdict(P, words(3), "") for _ in range(50)]
    assert first == second
    oracles.reseed_random(8)
    assert [oracles.random_verdict(P, "a", "b") for _ in range(50)] != first
    oracles.reseed_random()
    counts = Counter(oracles.random_verdict(P, "x", "y") for _ in range(6000))
    assert set(counts) == {"a", "b", "tie"}
    for v in ("a", "b", "tie"):  # 1/3 each; 6 sigma is about 0.036
        assert abs(counts[v] / 6000 - 1 / 3) < 0.04, counts
    oracles.reseed_random()


# -- held-out leaks ----------------------------------------------------------------------------

def test_normalise():
    assert normalise("  What's   UP?!\n") == "what s up"
    assert normalise("How do I make a cup of tea?") == normalise("how do i make a cup, of tea")
    assert normalise("") == ""


def test_near_duplicates():
    seeds = ["How do I make a cup of tea?", "Why is the sky blue?", "How do vaccines work?"]
    held = ["How do I make a GOOD cup of tea?!", "How does a vaccine work?", "Why is the sky dark at night?",
            "How do spiders spin their webs?", "why is the sky blue"]
    found = near_duplicates(held, seeds, THRESHOLD)
    assert [(h, s) for h, s, _ in found] == [
        ("How do I make a GOOD cup of tea?!", "How do I make a cup of tea?"),
        ("How does a vaccine work?", "How do vaccines work?"),
        ("why is the sky blue", "Why is the sky blue?"),
    ]
    assert all(score == 1.0 for _, _, score in found)
    assert similarity("Why is the sky dark at night?", "Why is the sky blue?") == 0.25
    assert near_duplicates(held, [], THRESHOLD) == []


def test_leaked_prompts():
    held = ["What is an atom?", "How do owls see in the dark?", "Why do boats float?"]
    used = ["what is an ATOM", "Why do boats float!!", "How do fish breathe?"]
    assert leaked_prompts(held, used) == ["What is an atom?", "Why do boats float?"]
    assert leaked_prompts(held, ["How do owls see at night?"]) == []


def test_check_run_prompts(tmp_path):
    held = ["What is an atom?", "Why do boats float?"]
    path = tmp_path / "prompts.json"
    assert check_run_prompts(path, held) == {"available": False, "leaked": [], "message": "leak check: not available"}
    sys_msg = {"role": "system", "content": "You are a helpful AI assistant."}
    path.write_text(json.dumps({
        "rollout": [[sys_msg, {"role": "user", "content": "WHAT is an atom"}],
                    [{"role": "user", "content": "Why do boats float?"}, {"role": "assistant", "content": "x"},
                     {"role": "user", "content": "Tell me more."}]],
        "gate": [[{"role": "user", "content": "How do fish breathe?"}]],
    }))
    out = check_run_prompts(path, held)
    assert out["leaked"] == ["What is an atom?"]  # only the last user message counts
    assert out["message"] == "leak check: 1 of 2 held-out prompts among 2 rollout / 1 gate prompts"
    path.write_text(json.dumps({"rollout": [[{"role": "user", "content": "Hi"}]], "gate": []}))
    assert check_run_prompts(path, held)["message"] == "leak check: 0 of 2 held-out prompts among 1 rollout / 0 gate prompts"


def test_shipped_heldout_prompts_are_held_out():
    held = learning.load_lines(learning.ROOT / "benchmarks" / "heldout_prompts.txt")
    seeds = load_seed_prompts()
    assert len(held) >= 80
    assert len({normalise(h) for h in held}) == len(held)
    assert not {normalise(h) for h in held} & {normalise(s) for s in seeds}
    assert near_duplicates(held, seeds, THRESHOLD) == []


# -- win rates -----------------------------------------------------------------------------------

def test_summarize_and_decisive_win_rate():
    scores = [1.0, 0.5, 0.0, 1.0, 0.5]
    s = learning.summarize(scores, seed=1)
    assert s["win_rate"] == pytest.approx(0.6)
    assert (s["wins"], s["ties"], s["losses"], s["n"]) == (2, 2, 1, 5)
    assert 0.0 <= s["ci_low"] <= 0.6 <= s["ci_high"] <= 1.0
    d = learning.decisive_win_rate(scores, seed=1)
    assert d["win_rate"] == pytest.approx(2 / 3)
    assert (d["wins"], d["ties"], d["losses"], d["n"]) == (2, 0, 1, 3)
    assert learning.decisive_win_rate([1.0, 1.0])["ci_low"] == 1.0
    empty = learning.decisive_win_rate([0.5, 0.5])
    assert empty["win_rate"] is None and empty["n"] == 0


def test_length_matched_win_rate():
    assert learning.length_matched(words(10), words(11))  # 1 <= 0.15 * 11
    assert not learning.length_matched(words(10), words(12))  # 2 > 0.15 * 12
    assert learning.length_matched(words(20), words(17))  # 3 <= 3.0
    assert learning.length_matched("", "")
    new = [words(10), words(10), words(20), words(40)]
    old = [words(11), words(20), words(19), words(100)]
    scores = [1.0, 0.0, 0.5, 1.0]
    r = learning.length_matched_win_rate(scores, new, old, seed=0)
    assert r["win_rate"] == pytest.approx(0.75)  # pairs 1 and 3: a win and a tie
    assert (r["n"], r["wins"], r["ties"], r["losses"]) == (2, 1, 1, 0)
    assert r["tolerance"] == 0.15
    assert learning.length_matched_win_rate([1.0], [words(5)], [words(50)])["n"] == 0


def test_judge_and_win_rate_follow_the_shown_order():
    prompts = ["q1", "q2", "q3", "q4"]
    new = [words(5), words(5), words(30), words(10)]
    old = [words(30), words(30), words(5), words(10)]
    # concise: new wins, wins, loses, ties, whichever order each pair is shown in
    for seed in range(5):
        assert learning.judge(new, old, prompts, oracles.concise, seed) == [1.0, 1.0, 0.0, 0.5]
    w = learning.win_rate(new, old, prompts, oracles.concise, 0)
    assert w["win_rate"] == pytest.approx(2.5 / 4) and (w["wins"], w["ties"], w["losses"]) == (2, 1, 1)



def test_the_length_axis_sets_a_reward_model_against_the_oracle_on_halved_answers():
    from benchmarks.oracles import first_half
    from benchmarks.run_report import length_axis

    four = "One two. Three four! Five six? Seven eight."
    assert first_half(four) == "One two. Three four!"
    assert first_half("One. Two. Three.") is None  # too short to halve
    rows = [{"prompt": P, "served": four}, {"prompt": P, "served": "Short one."},
            {"prompt": P, "served": "A b c. D e f. G h i. J k l. M n o. P q r."}]

    def longer_is_better(prompts, answers):
        assert len(prompts) == len(answers) == 2  # the answer too short to halve is left out
        return [float(len(a)) for a in answers]

    verbose = length_axis(longer_is_better, rows, "verbose")
    assert verbose["n"] == verbose["oracle_decisive"] == 2
    assert verbose["rm_prefers_whole"] == verbose["oracle_prefers_whole"] == verbose["agreement"] == 1.0
    concise = length_axis(longer_is_better, rows, "concise")
    assert (concise["oracle_prefers_whole"], concise["agreement"]) == (0.0, 0.0)
    assert length_axis(longer_is_better, rows[1:2], "concise") is None

# -- CLI and report ---------------------------------------------------------------------------

def test_parse_oracles():
    assert learning.parse_oracles(None) == learning.DEFAULT_ORACLES.split(",")
    assert learning.DEFAULT_ORACLES.split(",")[-1] == "random"
    assert learning.parse_oracles(["concise"]) == ["concise"]
    assert learning.parse_oracles(["concise, lists", "random", "lists"]) == ["concise", "lists", "random"]
    assert learning.parse_oracles(["concise"], null_control=True) == ["concise", "random"]
    assert learning.expected_decision("random") == "rejected"
    assert learning.expected_decision("concise") == "promoted"


def _report(oracle: str, status: str, leaked: list[str]) -> dict:
    rate = {"win_rate": 0.8, "ci_low": 0.7, "ci_high": 0.9, "wins": 8, "ties": 0, "losses": 2, "n": 10}
    return {
        "oracle": oracle, "expected": learning.expected_decision(oracle), "votes": {"a": 3, "b": 2, "tie": 1,
                                                                                    "errors": 0},
        "judgements": {"a": {"seen": 3, "used": 3, "dropped": {}}, "tie": {"seen": 1, "used": 0,
                                                                          "dropped": {"tie": 1}}},
        "status": status, "reason": "gate | ok", "run": "run-1",
        "rm_heldout_accuracy": {"accuracy": 0.9, "ci_low": 0.8, "ci_high": 0.95}, "kl_to_sft": 3.2,
        "oracle_win_rate": rate, "decisive_win_rate": rate, "length_matched_win_rate": {**rate, "n": 4},
        "mean_words": {"sft": 90.0, "new": 50.0},
        "leak_check": {"available": True, "leaked": leaked, "message": f"leak check: {len(leaked)} of 80 ..."},
        "phases_s": {"start_app": 30.0, "canary": 0.0, "total": 100.0},
    }


def test_matrix_and_failures():
    reports = [_report("concise", "promoted", []), _report("random", "promoted", []),
               _report("lists", "rejected", ["What is an atom?"]),
               {"oracle": "verbose", "expected": "promoted", "error": "CalledProcessError: boom"}]
    reports[0].update(reward_model={"design": "features", "steps_policy": 558, "steps_judge": 692},
                      ppo_stop={"stopped": "judge", "reason": "the judge's score stopped improving", "kept_step": 5,
                                "steps": 9},
                      eos_rate={"candidate": 0.9, "served": 0.5}, retrain_timings={"reward_s": 236.3})
    table = learning.matrix(reports)
    rows = [ln for ln in table.splitlines() if ln.startswith("| ")]
    # three tables, each a header and a row per oracle (the reward-model one skips a failed run)
    assert len(rows) == 3 * (1 + len(reports)) - 1
    assert ("| concise | features | 558/692 | 236 | judge: the judge's score stopped improving (5 of 9) "
            "| 90.0% vs 50.0% |") in table
    assert "| random | – | –/– | – | – | – vs – |" in table
    assert "| concise | 3/2/1 (errors 0)" not in table  # zero counts are not shown
    assert "| concise | 3/2/1 | a 3/3, tie 0/1 −1 | 0.90 (0.80-0.95) | 3.20 | 80.0% (70.0-90.0%)" in table
    assert "| random |" in table and "rejected ✗" in table and "LEAK 1" in table and "ERROR" in table
    problems = learning.failures(reports)
    assert len(problems) == 3
    assert any("null control was promoted" in p for p in problems)
    assert any("leaked" in p for p in problems)
    assert any("verbose" in p and "failed" in p for p in problems)
    assert learning.failures([_report("concise", "rejected", []), _report("random", "rejected", [])]) == []


# -- the loop, against a fake app ------------------------------------------------------------------

class FakeWorld:
    """A stand-in for the app and the retrain: the SFT version answers long, the candidate
    short; the retrain leaves the run in canary, and the canary promotes after a few votes."""

    def __init__(self, data_dir, canary_after: int = 4, leak: str | None = None):
        self.data_dir = data_dir
        self.lock = __import__("threading").Lock()
        self.served = "sft"
        self.opted_out: set[int] = set()
        self.chats: list[tuple[int, str]] = []
        self.votes: list[tuple[int, str]] = []
        self.run = None
        self.canary_after = canary_after
        self.leak = leak
        self.sessions = 0
        self.addresses: set[str | None] = set()  # X-Forwarded-For of each client session

    def client_class(world):
        class Client:
            def __init__(self, url, verbose=False, headers=None):
                with world.lock:
                    world.sessions += 1
                    self.sid = world.sessions
                    world.addresses.add((headers or {}).get("X-Forwarded-For"))

            def predict(self, *args, api_name):
                with world.lock:
                    if api_name == "/opt_out":
                        assert args == (True,)
                        world.opted_out.add(self.sid)
                        return "opted out"
                    if api_name == "/new_chat":
                        return [], "New chat", None
                    if api_name == "/chat":
                        world.chats.append((self.sid, args[0]))
                        text = words(5) if world.served == "cand" else words(30)
                        return [{"role": "user", "content": args[0]}, {"role": "assistant", "content": text}], \
                            world.served, ""
                    if api_name == "/regenerate":
                        return words(30), words(5), world.served, ""
                    if api_name == "/vote":
                        world.votes.append((self.sid, args[0]))
                        if world.run and world.run["status"] == "canary" and len(world.votes) >= world.canary_at:
                            world.run["status"], world.run["reason"] = "promoted", "canary: B preferred"
                            world.served = "cand"
                        return [], "thanks"
                raise AssertionError(api_name)
        return Client

    def retrain(self, cmd, **kw):
        from pathlib import Path

        assert cmd[1:5] == ["-m", "retrain", "run", "--now"]
        self.canary_at = len(self.votes) + self.canary_after
        self.run = {"id": "run-x", "status": "canary", "reason": "offline gate passed", "candidate_version": "cand",
                    "kl": 1.5, "rm_accuracy": 0.9, "rm_ci_low": 0.8, "rm_ci_high": 0.95,
                    "data": json.dumps({"judgements": {"a": {"seen": 2, "used": 2, "dropped": {}}}}),
                    "decision": json.dumps({"timings": {"rm": 1}})}
        run_dir = Path(self.data_dir) / "runs" / "run-x"
        run_dir.mkdir(parents=True)
        rollout = [[{"role": "user", "content": self.leak or "How do fish breathe?"}]]
        (run_dir / "prompts.json").write_text(json.dumps({"rollout": rollout, "gate": rollout * 2}))

    def run_row(self, data_dir, run_id=None):
        with self.lock:
            return dict(self.run)


@pytest.fixture
def fake_world(tmp_path, monkeypatch):
    import sys
    import types

    world = FakeWorld(str(tmp_path))
    monkeypatch.setitem(sys.modules, "gradio_client", types.SimpleNamespace(Client=world.client_class()))

    class App:
        def __init__(self, args, env):
            self.url = "http://fake/"

        def wait_ready(self):
            pass

        def stop(self):
            pass

    monkeypatch.setattr(learning, "App", App)
    monkeypatch.setattr(learning.subprocess, "run", world.retrain)
    monkeypatch.setattr(learning, "run_row", world.run_row)
    return world


def test_run_oracle_opts_out_evaluation_and_follows_the_canary(fake_world, tmp_path):
    args = learning.build_parser().parse_args(["--users", "2", "--preferences", "6", "--samples", "2",
                                               "--data-dir", str(tmp_path), "--canary-poll-votes", "1"])
    heldout = ["What is an atom?", "Why do boats float?", "How do owls see in the dark?"]
    train = ["How do fish breathe?", "Why is the sky blue?"]
    report = learning.run_oracle("concise", args, heldout, train, {})
    # evaluation sessions opted out before chatting; voting sessions did not
    eval_sessions = {sid for sid, prompt in fake_world.chats if prompt in heldout or prompt == "Hi"}
    vote_sessions = {sid for sid, _ in fake_world.votes}
    assert eval_sessions and eval_sessions <= fake_world.opted_out
    assert vote_sessions and not vote_sessions & fake_world.opted_out
    assert not {p for _, p in fake_world.chats if p in heldout} & set(train)
    # the canary went on until the run was promoted, with the same users
    assert report["status"] == "promoted" and report["canary"]["entered"] and report["canary"]["decided"]
    assert report["votes_collect"]["a"] + report["votes_collect"]["b"] + report["votes_collect"]["tie"] == 6
    assert sum(report["votes_canary"][k] for k in ("a", "b", "tie")) >= 4
    assert report["votes"]["b"] == len(fake_world.votes)  # concise always prefers B (5 vs 30 words)
    assert len(vote_sessions) <= 2
    # every simulated user is a client of its own (per-client limits must not serialise them)
    assert len(fake_world.addresses) == fake_world.sessions and None not in fake_world.addresses
    assert report["judgements"] == {"a": {"seen": 2, "used": 2, "dropped": {}}}
    assert report["leak_check"]["message"] == "leak check: 0 of 3 held-out prompts among 1 rollout / 2 gate prompts"
    # the new version answers short: concise prefers it every time, never length-matched
    assert report["oracle_win_rate"]["win_rate"] == 1.0 and report["oracle_win_rate"]["n"] == 6
    assert report["decisive_win_rate"]["n"] == 6
    assert report["length_matched_win_rate"]["n"] == 0
    assert report["mean_words"] == {"sft": 30.0, "new": 5.0}
    assert set(report["phases_s"]) == set(learning.PHASES)
    assert learning.failures([report]) == []


def test_run_oracle_reports_a_leak(fake_world, tmp_path):
    fake_world.leak = "why do BOATS float"
    args = learning.build_parser().parse_args(["--users", "1", "--preferences", "2", "--samples", "1",
                                               "--data-dir", str(tmp_path), "--canary-poll-votes", "1"])
    report = learning.run_oracle("concise", args, ["Why do boats float?"], ["How do fish breathe?"], {})
    assert report["leak_check"]["leaked"] == ["Why do boats float?"]
    assert any("leaked" in p for p in learning.failures([report]))
