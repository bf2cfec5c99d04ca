"""Load benchmark: N simulated users drive the public API of a real app over loopback.

Each user is one ``gradio_client.Client`` (one server-side session) and, for a fixed number
of turns: chats (streamed; time to first token measured), regenerates (streamed), votes on
the comparison, gives a thumb with a reason and a comment, and rewrites the latest answer.
At the end the database is checked against what the clients were told:

- every vote acknowledged ("Recorded: ...") is in ``comparisons`` exactly once, with its
  verdict; no vote that failed is decided;
- every acknowledged rating and rewrite is stored exactly once;
- ``PRAGMA integrity_check`` is ok;
- zero failed requests and zero tracebacks in the server log.

It starts the app itself (``python app.py --data-dir TMP --port FREE --model ...``) unless
``--url`` names a running one; only loopback addresses are accepted.  Requests are bounded:
at most users x turns x 5, and no turn starts after ``--max-seconds``.

``--during-retrain`` seeds decided comparisons first, then starts ``python -m retrain run
--now`` against the same data directory and runs the load while it trains (the retrain uses
the model the app runs; on the embedded model a run takes far longer than the load, so it
is stopped at the end unless it finished).

    python benchmarks/load.py                              # 32 users x 3 turns, embedded model
    python benchmarks/load.py --users 6 --turns 2 --model /path/to/tiny-model
    python benchmarks/load.py --during-retrain --retrain-config retrain.json

``--flood N`` adds one abusive client: N sessions from a single address, each streaming
``--flood-tokens``-token answers over and over (retrying a refusal after a second) for as
long as the users run.  The users' time to first token is then what fairness buys them
(per-client caps, round-robin admission, a bounded queue: ``assistant/engine/scheduler.py``);
``--no-fairness`` lifts the app's per-client limits, for the figure without them:

    python benchmarks/load.py --users 1 --turns 5 --flood 24 --flood-tokens 1024
    python benchmarks/load.py --users 1 --turns 5 --flood 24 --flood-tokens 1024 --no-fairness

``--body-flood N`` first posts N request bodies of ``--body-mb`` MiB each (JSON for the chat's
``/gradio_api/queue/join``, every other one sent chunked, ``--body-concurrency`` at a time)
and reports the app's resident memory before, at its peak and after, measured in the same
run; with the request-body cap (``--max-request-bytes``, 1 MiB) every one is refused (413)
before it is read.  ``--no-body-limit`` starts the app without the cap, for the figure
without it (the users may be 0):

    python benchmarks/load.py --users 0 --body-flood 50 --body-mb 30
    python benchmarks/load.py --users 0 --body-flood 50 --body-mb 30 --no-body-limit

The started app trusts X-Forwarded-For from loopback (``--trusted-proxies 127.0.0.1,::1``),
so each simulated user is a client of its own (``as_client``); a running app given with
``--url`` must be started so too.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sqlite3
import string
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from assistant.client import LOOPBACK_PROXIES, as_client, free_port  # noqa: E402

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
VERDICTS = ("a", "b", "tie", "both_bad")
SYSTEM = "You are a helpful AI assistant."
CALL_TIMEOUT_S = 300
TOPICS = ("rain", "bread", "rivers", "chess", "owls", "bicycles", "tea", "maps", "clocks", "bees")


def tag() -> str:
    """Letters only, so PII scrubbing never rewrites it."""
    return "".join(random.choices(string.ascii_lowercase, k=12))


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


# ----------------------------------------------------------------------------- the app
def start_app(data_dir: Path, model: str, port: int, log_path: Path, extra: list[str] | None = None,
              env: dict | None = None) -> subprocess.Popen:
    cmd = [sys.executable, str(ROOT / "app.py"), "--data-dir", str(data_dir), "--port", str(port),
           "--host", "127.0.0.1", "--model", model, "--no-retrain-enabled",
           "--trusted-proxies", LOOPBACK_PROXIES, *(extra or [])]  # the users' X-Forwarded-For (as_client)
    log = open(log_path, "ab")
    return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})}, start_new_session=True)


def wait_ready(url: str, proc: subprocess.Popen | None, timeout_s: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the app exited with status {proc.returncode} before serving")
        try:
            if httpx.get(url.rstrip("/") + "/config", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the app did not answer on {url} within {timeout_s:.0f} s")


def stop_process(proc: subprocess.Popen, timeout_s: float = 20) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def seed_votes(db_path: Path, n: int) -> None:
    """n decided comparisons (the short answer wins) so a retrain has data to train on."""
    from feedback.store import FeedbackStore

    store = FeedbackStore(db_path)
    try:
        for i in range(n):
            sid = f"seed-session-{i % 4}"
            conv = store.start_conversation(sid, SYSTEM)
            context = [{"role": "system", "content": SYSTEM},
                       {"role": "user", "content": f"Question number {i}: what is {i} plus {i}?"}]
            common = dict(session_id=sid, conversation_id=conv, turn=1, context=context, model_version="seed",
                          sampling={"temperature": 0.7}, prompt_tokens=20, completion_tokens=5, ttft_ms=1.0,
                          latency_ms=2.0, finish_reason="stop")
            long = store.record_generation(content=f"Well, let me think at length about {i} and {i}. " * 3,
                                           **common)
            short = store.record_generation(content=f"{2 * i}.", **common)
            cid = store.open_comparison(session_id=sid, conversation_id=conv, turn=1, a_generation_id=long,
                                        b_generation_id=short)
            store.decide_comparison(cid, "b", sid)
    finally:
        store.close()


# ----------------------------------------------------------------------------- the users
@dataclass
class UserResult:
    user: int
    requests: int = 0
    errors: list[str] = field(default_factory=list)
    ttft_s: list[float] = field(default_factory=list)
    vote_s: list[float] = field(default_factory=list)
    acked_votes: list[tuple[str, str]] = field(default_factory=list)  # (message, verdict)
    failed_votes: list[str] = field(default_factory=list)  # messages whose vote failed
    acked_ratings: list[str] = field(default_factory=list)  # comments
    acked_edits: list[str] = field(default_factory=list)  # rewrites
    turns_done: int = 0


def _stream(client, args: tuple, api_name: str) -> tuple[object, float | None]:
    """Submits a streamed call; returns (final output, seconds to the first non-empty text)."""
    t0 = time.perf_counter()
    first = None
    job = client.submit(*args, api_name=api_name)
    # polled, not iterated: iterating a Job that ends in an error never stops (gradio_client 2.7)
    while not job.done():
        if first is None and any(_has_text(out, api_name) for out in job.outputs()):
            first = time.perf_counter() - t0
        if time.perf_counter() - t0 > CALL_TIMEOUT_S:
            job.cancel()
            raise TimeoutError(f"{api_name} did not finish within {CALL_TIMEOUT_S} s")
        time.sleep(0.01)
    result = job.result(timeout=60)
    if first is None and _has_text(result, api_name):
        first = time.perf_counter() - t0
    return result, first


def _has_text(out, api_name: str) -> bool:
    if api_name == "/regenerate":
        return bool(out and len(out) > 1 and out[1] and out[1] != "…")
    history = out[0] if out else None
    if not history or history[-1].get("role") != "assistant":
        return False
    content = history[-1].get("content")
    return bool(content) if isinstance(content, str) else bool(json.dumps(content).strip("[]{}\" "))


def run_user(url: str, user: int, turns: int, max_new_tokens: int, deadline: float) -> UserResult:
    from gradio_client import Client

    res = UserResult(user)

    def call(what: str, fn, *args, **kwargs):
        res.requests += 1
        try:
            return True, fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - every failure is counted and reported
            res.errors.append(f"user {user} {what}: {type(exc).__name__}: {exc}"[:300])
            return False, None

    ok, client = call("connect", Client, url, verbose=False, headers=as_client(user))
    if not ok:
        return res
    rng = random.Random(user)
    for _ in range(turns):
        if time.monotonic() > deadline:
            break
        t = tag()
        message = f"Tell me one short fact about {rng.choice(TOPICS)} ({t})."
        sampling = (0.7, 0.9, max_new_tokens, -1)
        ok, out = call("chat", _stream, client, (message, SYSTEM, *sampling), "/chat")
        if not ok:
            continue
        if out[1] is not None:
            res.ttft_s.append(out[1])
        ok, out = call("regenerate", _stream, client, sampling, "/regenerate")
        if ok and out[1] is not None:
            res.ttft_s.append(out[1])
        if ok:
            verdict = rng.choice(VERDICTS)
            t0 = time.perf_counter()
            ok, out = call("vote", client.predict, verdict, api_name="/vote")
            if ok and str(out[1]).startswith("Recorded"):
                res.vote_s.append(time.perf_counter() - t0)
                res.acked_votes.append((message, verdict))
            else:
                res.failed_votes.append(message)
        comment = f"comment {t}"
        ok, out = call("rate", client.predict, 0, rng.choice(["up", "down"]), ["too long"], comment,
                       api_name="/rate")
        if ok and str(out).startswith("Recorded"):
            res.acked_ratings.append(comment)
        rewrite = f"My rewrite {tag()}."  # a fresh tag: the model cannot have written it already
        ok, out = call("edit", client.predict, rewrite, api_name="/edit")
        if ok and str(out[1]).startswith("Recorded"):
            res.acked_edits.append(rewrite)
        res.turns_done += 1
    return res


FLOOD_CLIENT = 1_000_000  # the flooder's address number (``as_client``): one client, many sessions
NO_FAIRNESS = ["--client-max-streams", "100000", "--client-max-waiting", "100000", "--max-waiting", "100000"]


@dataclass
class FloodResult:
    answered: int = 0
    refused_busy: int = 0  # "busy, try again in about N s" (the bounded queue)
    refused_rate: int = 0  # "too many messages" (the per-client rate limit)
    failed: list[str] = field(default_factory=list)


def run_flooder(url: str, session: int, tokens: int, stop: threading.Event, res: FloodResult,
                lock: threading.Lock) -> None:
    """One of the flooding client's sessions: long answers back to back until ``stop``."""
    from gradio_client import Client

    client = Client(url, verbose=False, headers=as_client(FLOOD_CLIENT))
    while not stop.is_set():
        job = client.submit(f"Write a very long story about {TOPICS[session % len(TOPICS)]} ({tag()}).",
                            SYSTEM, 0.7, 0.9, tokens, -1, api_name="/chat")
        while not job.done() and not stop.is_set():
            time.sleep(0.05)
        if not job.done():
            client.predict(api_name="/stop")
            return
        try:
            job.result(timeout=60)
            outcome = "answered"
        except Exception as exc:  # noqa: BLE001 - refusals are the point; other failures are reported
            text = str(exc)
            outcome = "refused_busy" if "try again in about" in text and "too many" not in text else \
                "refused_rate" if "too many messages" in text else text[:200]
        with lock:
            if outcome in ("answered", "refused_busy", "refused_rate"):
                setattr(res, outcome, getattr(res, outcome) + 1)
            else:
                res.failed.append(outcome)
        if outcome != "answered":
            stop.wait(1.0)


# ----------------------------------------------------------------------------- large bodies
@dataclass
class BodyFloodResult:
    requests: int = 0
    statuses: dict[str, int] = field(default_factory=dict)  # HTTP status (or exception name) -> count
    sent_mb: float = 0.0
    duration_s: float = 0.0
    rss_before_mb: float | None = None
    rss_peak_mb: float | None = None
    rss_after_mb: float | None = None


def _rss_mb(pid: int | None) -> float | None:
    if not pid:
        return None
    try:
        import psutil

        return psutil.Process(pid).memory_info().rss / 2**20
    except Exception:  # noqa: BLE001 - psutil missing or the process gone: no figure
        return None


def run_body_flood(url: str, pid: int | None, n: int, mb: int, concurrency: int, settle_s: float = 3.0
                   ) -> BodyFloodResult:
    """``n`` POSTs of ``mb`` MiB each to the chat's queue/join (JSON the app would parse),
    alternately with a Content-Length and chunked, ``concurrency`` at a time; the app's RSS
    before, at its peak (sampled every 0.1 s) and ``settle_s`` after the last one."""
    import httpx

    base = url.rstrip("/")
    cfg = httpx.get(base + "/config", timeout=30).json()
    fn = next(d["id"] for d in cfg["dependencies"] if d.get("api_name") == "chat")
    # a /chat call whose message is the padding: {..., "data": ["xxx...", "", 0.7, 0.9, 8, -1, null]}
    head = json.dumps({"fn_index": fn, "session_hash": "body-flood", "event_data": None, "trigger_id": None,
                       "data": ""})[:-3].encode() + b'["'
    tail = b'", "", 0.7, 0.9, 8, -1, null]}'
    body = head + b"x" * (mb * 2**20 - len(head) - len(tail)) + tail  # one buffer, reused by every request
    res = BodyFloodResult(requests=n)
    lock = threading.Lock()
    time.sleep(settle_s)
    res.rss_before_mb = res.rss_peak_mb = _rss_mb(pid)
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.1):
            rss = _rss_mb(pid)
            if rss is not None:
                with lock:
                    res.rss_peak_mb = max(res.rss_peak_mb or 0.0, rss)

    def chunks():
        view = memoryview(body)
        for i in range(0, len(body), 2**20):
            yield bytes(view[i:i + 2**20])

    def post(i: int) -> None:
        try:
            with httpx.Client(timeout=120) as http:
                r = http.post(base + "/gradio_api/queue/join", content=body if i % 2 == 0 else chunks(),
                              headers={"content-type": "application/json"})
            outcome = str(r.status_code)
        except httpx.HTTPError as exc:
            outcome = type(exc).__name__
        with lock:
            res.statuses[outcome] = res.statuses.get(outcome, 0) + 1

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        list(pool.map(post, range(n)))
    res.duration_s = round(time.monotonic() - t0, 1)
    res.sent_mb = n * len(body) / 2**20
    time.sleep(settle_s)
    done.set()
    sampler.join()
    res.rss_after_mb = _rss_mb(pid)
    return res


# ----------------------------------------------------------------------------- checks
def verify(db_path: Path, results: list[UserResult]) -> list[str]:
    """What the database holds against what the clients were told; returns the problems."""
    problems: list[str] = []
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=30)
    try:
        integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
        if integrity != "ok":
            problems.append(f"integrity_check: {integrity}")
        by_message: dict[str, list[tuple]] = {}
        for context, verdict in conn.execute(
                "SELECT context, verdict FROM comparisons WHERE source = 'regenerate'"):
            last = json.loads(context)[-1]["content"]
            by_message.setdefault(last, []).append(verdict)
        for r in results:
            for message, verdict in r.acked_votes:
                decided = [v for v in by_message.get(message, []) if v is not None]
                if decided != [verdict]:
                    problems.append(f"acknowledged vote {verdict!r} on {message!r} stored as {decided}")
            for message in r.failed_votes:
                decided = [v for v in by_message.get(message, []) if v is not None]
                if decided:
                    problems.append(f"failed vote on {message!r} is stored as {decided}")
            for comment in r.acked_ratings:
                n = conn.execute("SELECT count(*) FROM ratings WHERE comment = ?", (comment,)).fetchone()[0]
                if n != 1:
                    problems.append(f"acknowledged rating {comment!r} stored {n} times")
            for rewrite in r.acked_edits:
                n = conn.execute("SELECT count(*) FROM comparisons WHERE source = 'edit' AND b_text = ?",
                                 (rewrite,)).fetchone()[0]
                if n != 1:
                    problems.append(f"acknowledged rewrite {rewrite!r} stored {n} times")
    finally:
        conn.close()
    return problems


def server_errors(log_path: Path | None) -> list[str]:
    if log_path is None or not log_path.exists():
        return []
    lines = log_path.read_text(errors="replace").splitlines()
    return [line for line in lines if "Traceback" in line or " 500 " in line or " ERROR " in line]


# ----------------------------------------------------------------------------- the run
def run(args: argparse.Namespace) -> dict:
    own_dir = None
    app = retrain = None
    log_path = None
    if args.url:
        host = urlparse(args.url).hostname
        if host not in LOOPBACK:
            raise SystemExit(f"refusing {args.url}: the load benchmark only sends traffic to loopback")
        if not args.data_dir:
            raise SystemExit("--url needs --data-dir (the app's data directory, to check the database)")
        url, data_dir = args.url, Path(args.data_dir)
    else:
        if args.data_dir:
            data_dir = Path(args.data_dir)
        else:
            own_dir = tempfile.TemporaryDirectory(prefix="load-")
            data_dir = Path(own_dir.name)
        data_dir.mkdir(parents=True, exist_ok=True)
        if args.during_retrain and args.seed_votes:
            seed_votes(data_dir / "feedback.sqlite", args.seed_votes)
        port = args.port or free_port()
        url = f"http://127.0.0.1:{port}/"
        log_path = data_dir / "app.log"
        extra = ["--max-new-tokens", str(args.max_new_tokens), "--max-batch", str(args.max_batch),
                 "--threads", str(args.threads), *(NO_FAIRNESS if args.no_fairness else []),
                 *(["--max-request-bytes", "0"] if args.no_body_limit else [])]
        app = start_app(data_dir, args.model, port, log_path, extra)
    db_path = data_dir / "feedback.sqlite"
    report: dict = {"users": args.users, "turns": args.turns, "model": args.model, "url": url}
    try:
        if app is not None:
            wait_ready(url, app, args.start_timeout)
        if args.body_flood:
            bf = run_body_flood(url, app.pid if app is not None else args.app_pid, args.body_flood, args.body_mb,
                                args.body_concurrency)
            report["body_flood"] = {**bf.__dict__, "mb_each": args.body_mb, "limit": not args.no_body_limit}
        if args.during_retrain:
            cmd = [sys.executable, "-m", "retrain", "run", "--now", "--data-dir", str(data_dir),
                   "--model", args.model, "--retrain-threads", "1"]
            if args.retrain_config:
                cmd += ["--retrain-config", args.retrain_config]
            retrain = subprocess.Popen(cmd, cwd=ROOT, stdout=open(data_dir / "retrain.log", "ab"),
                                       stderr=subprocess.STDOUT, start_new_session=True)
            report["retrain_running_at_start"] = _wait_run_started(db_path, retrain, 120)
        flood, flood_stop, flood_lock = FloodResult(), threading.Event(), threading.Lock()
        flooders = [threading.Thread(target=run_flooder, args=(url, i, args.flood_tokens, flood_stop, flood,
                                                                flood_lock), daemon=True)
                    for i in range(args.flood)]
        for th in flooders:
            th.start()
        if flooders:
            time.sleep(args.flood_head_start)  # the flood is on before the users arrive
        t0 = time.monotonic()
        deadline = t0 + args.max_seconds
        results: list[UserResult] = [UserResult(i) for i in range(args.users)]

        def worker(i: int) -> None:
            time.sleep(i * args.ramp_s)
            results[i] = run_user(url, i, args.turns, args.max_new_tokens, deadline)

        threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(args.users)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(max(1.0, deadline + 600 - time.monotonic()))
        duration = time.monotonic() - t0
        flood_stop.set()
        for th in flooders:
            th.join(120)
        if flooders:
            report["flood"] = {"sessions": args.flood, "tokens": args.flood_tokens, "fairness": not args.no_fairness,
                               "answered": flood.answered, "refused_busy": flood.refused_busy,
                               "refused_rate": flood.refused_rate, "failed": flood.failed[:5]}
        if retrain is not None:
            report["retrain_running_at_end"] = retrain.poll() is None
            if retrain.poll() is None and args.retrain_wait:
                try:
                    retrain.wait(args.retrain_wait)
                except subprocess.TimeoutExpired:
                    pass
            if retrain.poll() is None:
                stop_process(retrain)
                report["retrain"] = "stopped at the end of the load (still training)"
            else:
                report["retrain"] = f"finished during the load (exit {retrain.returncode})"
            report["retrain_runs"] = _runs(db_path)
        ttft = [x for r in results for x in r.ttft_s]
        votes = [x for r in results for x in r.vote_s]
        errors = [e for r in results for e in r.errors]
        report.update({
            "requests": sum(r.requests for r in results),
            "turns_done": sum(r.turns_done for r in results),
            "errors": len(errors),
            "error_samples": errors[:10],
            "acknowledged_votes": sum(len(r.acked_votes) for r in results),
            "failed_votes": sum(len(r.failed_votes) for r in results),
            "acknowledged_ratings": sum(len(r.acked_ratings) for r in results),
            "acknowledged_edits": sum(len(r.acked_edits) for r in results),
            "ttft_p50_s": percentile(ttft, 0.5), "ttft_p95_s": percentile(ttft, 0.95),
            "ttft_max_s": max(ttft, default=None),
            "vote_p50_s": percentile(votes, 0.5), "vote_p95_s": percentile(votes, 0.95),
            "duration_s": round(duration, 1),
        })
        if app is not None:
            stop_process(app)
            app = None
        report["db_problems"] = verify(db_path, results)
        report["server_errors"] = server_errors(log_path)[:10]
        report["ok"] = (report["errors"] == 0 and not report["db_problems"] and not report["server_errors"]
                        and report["turns_done"] == args.users * args.turns
                        and not report.get("flood", {}).get("failed")
                        and (not args.body_flood or args.no_body_limit
                             or report["body_flood"]["statuses"] == {"413": args.body_flood}))
        return report
    finally:
        for proc in (retrain, app):
            if proc is not None:
                stop_process(proc)
        if own_dir is not None and not args.keep:
            own_dir.cleanup()


def _wait_run_started(db_path: Path, proc: subprocess.Popen, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        if any(r["status"] == "running" for r in _runs(db_path)):
            return True
        time.sleep(0.5)
    return False


def _runs(db_path: Path) -> list[dict]:
    try:
        conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)
        try:
            rows = conn.execute("SELECT id, status, reason FROM training_runs").fetchall()
        finally:
            conn.close()
    except sqlite3.Error:
        return []
    return [{"id": r[0], "status": r[1], "reason": (r[2] or "")[:120]} for r in rows]


def format_report(r: dict) -> str:
    def ms(x):
        return "-" if x is None else f"{x * 1000:.0f} ms"

    lines = [f"users {r['users']}  turns {r['turns']}  model {r['model']}",
             f"requests {r['requests']}  turns done {r['turns_done']}  errors {r['errors']}  "
             f"duration {r['duration_s']} s",
             f"votes acknowledged {r['acknowledged_votes']} (failed {r['failed_votes']})  ratings "
             f"{r['acknowledged_ratings']}  rewrites {r['acknowledged_edits']}",
             f"time to first token p50 {ms(r['ttft_p50_s'])}  p95 {ms(r['ttft_p95_s'])}  "
             f"max {ms(r.get('ttft_max_s'))}",
             f"vote latency        p50 {ms(r['vote_p50_s'])}  p95 {ms(r['vote_p95_s'])}",
             f"database: {'every acknowledged judgement stored exactly once, integrity ok' if not r['db_problems'] else r['db_problems']}",
             f"server log errors: {len(r['server_errors'])}"]
    if "flood" in r:
        f = r["flood"]
        lines.append(f"flood: one client, {f['sessions']} sessions x {f['tokens']} tokens, fairness "
                     f"{'on' if f['fairness'] else 'off'}: {f['answered']} answered, {f['refused_busy']} refused "
                     f"busy, {f['refused_rate']} refused by the rate limit, {len(f['failed'])} failed")
    if "body_flood" in r:
        b = r["body_flood"]

        def mb(x):
            return "-" if x is None else f"{x:.0f} MB"

        ratio = (f" ({b['rss_after_mb'] / b['rss_before_mb']:.2f} x)" if b["rss_after_mb"] and b["rss_before_mb"]
                 else "")
        lines.append(f"body flood: {b['requests']} x {b['mb_each']} MiB ({b['sent_mb']:.0f} MiB) in {b['duration_s']} s, "
                     f"body limit {'on' if b['limit'] else 'off'}: answers {b['statuses']}; app RSS before "
                     f"{mb(b['rss_before_mb'])}, peak {mb(b['rss_peak_mb'])}, after {mb(b['rss_after_mb'])}{ratio}")
    if "retrain" in r:
        lines.append(f"retrain: running at start {r.get('retrain_running_at_start')}; {r['retrain']}; "
                     f"runs {r['retrain_runs']}")
    for e in r["error_samples"]:
        lines.append(f"  error: {e}")
    lines.append("OK" if r["ok"] else "FAILED")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=32, help="simulated users, one gradio_client session each")
    p.add_argument("--turns", type=int, default=3, help="turns per user (each: chat, regenerate, vote, rate, edit)")
    p.add_argument("--model", default="embedded", help="model the started app serves (default: embedded)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="answer length per generation")
    p.add_argument("--max-batch", type=int, default=8, help="the app's --max-batch")
    p.add_argument("--threads", type=int, default=0, help="the app's torch threads (0 = default)")
    p.add_argument("--data-dir", default="", help="data directory (default: a temporary one)")
    p.add_argument("--port", type=int, default=0, help="port for the started app (default: a free one)")
    p.add_argument("--url", default="", help="use a running app at this loopback URL instead of starting one")
    p.add_argument("--ramp-s", type=float, default=0.2, help="delay between user starts")
    p.add_argument("--max-seconds", type=float, default=900, help="no turn starts after this many seconds")
    p.add_argument("--start-timeout", type=float, default=300, help="seconds to wait for the app to serve")
    p.add_argument("--during-retrain", action="store_true",
                   help="run the load while `python -m retrain run --now` trains on the same data directory")
    p.add_argument("--seed-votes", type=int, default=40, help="decided comparisons seeded for the retrain")
    p.add_argument("--retrain-config", default="", help="JSON retrain config passed to the retrain")
    p.add_argument("--retrain-wait", type=float, default=0, help="seconds to let the retrain finish after the load")
    p.add_argument("--flood", type=int, default=0, help="sessions of one abusive client streaming long answers")
    p.add_argument("--flood-tokens", type=int, default=1024, help="max new tokens of each flood answer")
    p.add_argument("--flood-head-start", type=float, default=10, help="seconds the flood runs before the users start")
    p.add_argument("--no-fairness", action="store_true", help="lift the app's per-client limits (for comparison)")
    p.add_argument("--body-flood", type=int, default=0, help="large request bodies posted before the users start")
    p.add_argument("--body-mb", type=int, default=30, help="MiB per body of --body-flood")
    p.add_argument("--body-concurrency", type=int, default=5, help="bodies of --body-flood in flight at once")
    p.add_argument("--no-body-limit", action="store_true",
                   help="start the app without its request-body cap (for comparison)")
    p.add_argument("--app-pid", type=int, default=0, help="with --url: the app's process id, for its RSS")
    p.add_argument("--keep", action="store_true", help="keep the temporary data directory")
    p.add_argument("--json", default="", help="also write the report as JSON here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    report = run(args)
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
