"""The feedback store: the one module that owns the SQLite schema and its migrations.

SQL lives in ``feedback/`` only (this store, ``registry``, ``review``, ``auth``, ``export``,
``leaderboard``), behind named methods; ``assistant/``, ``retrain/`` and ``app.py`` call those
(``tests/integration/test_versions.py::test_no_sql_outside_feedback`` keeps it so).

Why it looks like this:
- WAL mode and a busy timeout, because the web server's threads, the retrain process and
  a maintainer's export all touch the same file at once;
- one connection per thread (sqlite3 connections are not shareable across threads), and
  every judgement written in one ``BEGIN IMMEDIATE`` transaction that is committed before
  the caller tells the user "recorded";
- each judgement carries its whole context as JSON (system prompt and every turn up to the
  judged one) so it can be trained on, audited or excluded without rebuilding history;
- a numbered list of migrations recorded in ``PRAGMA user_version``: a newer app opens an
  older user's database and upgrades it in place; new tables are added as new entries.

Schema (see ``MIGRATIONS``): sessions, conversations, messages, generations, comparisons
(pairwise verdicts and edits), ratings (thumbs), review_log (maintainer actions),
model_versions, serving_log, training_runs, run_metrics, reward_models, app_state, users.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import sqlite_utils

from feedback import pii

VERDICTS = ("a", "b", "tie", "both_bad")
THUMBS = ("up", "down")
REASON_TAGS = ("inaccurate", "didn't follow instructions", "unsafe", "too long", "too short",
               "refused needlessly", "other")


class StoreError(ValueError):
    """A request the store refuses; the message is meant for the user."""


class NotFound(StoreError):
    pass


class AlreadyDecided(StoreError):
    pass


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def new_id() -> str:
    return uuid.uuid4().hex


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


# ----------------------------------------------------------------------------- migrations
def _m1_core(db: sqlite_utils.Database) -> None:
    db["sessions"].create({"id": str, "user": str, "client": str, "opt_out": int,
                           "created_at": str, "updated_at": str}, pk="id", defaults={"opt_out": 0})
    db["conversations"].create({"id": str, "session_id": str, "system_prompt": str,
                                "created_at": str}, pk="id")
    db["messages"].create({"id": int, "conversation_id": str, "turn": int, "role": str,
                           "content": str, "generation_id": str, "created_at": str}, pk="id")
    db["generations"].create({
        "id": str, "session_id": str, "conversation_id": str, "turn": int, "context": str,
        "content": str, "model_version": str, "sampling": str, "prompt_tokens": int,
        "completion_tokens": int, "ttft_ms": float, "latency_ms": float, "finish_reason": str,
        "created_at": str}, pk="id")
    db["comparisons"].create({
        "id": str, "session_id": str, "conversation_id": str, "turn": int, "context": str,
        "a_generation_id": str, "b_generation_id": str, "a_text": str, "b_text": str,
        "verdict": str, "source": str, "created_at": str, "decided_at": str}, pk="id")
    db["ratings"].create({
        "id": str, "session_id": str, "conversation_id": str, "generation_id": str, "turn": int,
        "context": str, "answer_text": str, "thumb": str, "reasons": str, "comment": str,
        "created_at": str}, pk="id")
    db["messages"].create_index(["conversation_id", "turn"])
    db["generations"].create_index(["conversation_id"])
    db["comparisons"].create_index(["session_id"])
    db["comparisons"].create_index(["created_at"])
    db["ratings"].create_index(["created_at"])


def _m2_review_and_training(db: sqlite_utils.Database) -> None:
    for table in ("comparisons", "ratings"):
        db[table].add_column("excluded", int, not_null_default=0)
        db[table].add_column("exclude_reason", str)
        db[table].add_column("excluded_by", str)
        db[table].add_column("excluded_at", str)
        db[table].add_column("used_in_run", str)
    db["review_log"].create({"id": int, "record_type": str, "record_id": str, "action": str,
                             "reason": str, "actor": str, "at": str}, pk="id")
    db["model_versions"].create({
        "id": str, "parent_id": str, "kind": str, "path": str, "base_model": str,
        "created_at": str, "run_id": str, "metrics": str, "config": str, "feedback": str,
        "note": str}, pk="id")
    db["serving_log"].create({"id": int, "version_id": str, "action": str, "actor": str,
                              "reason": str, "at": str}, pk="id")
    db["training_runs"].create({
        "id": str, "status": str, "trigger": str, "created_at": str, "started_at": str,
        "finished_at": str, "heartbeat_at": str, "pid": int, "n_preferences": int,
        "data": str, "config": str, "reward_model_id": str, "rm_accuracy": float,
        "rm_ci_low": float, "rm_ci_high": float, "rm_margin": float, "kl": float,
        "candidate_version": str, "decision": str, "reason": str}, pk="id")
    db["run_metrics"].create({"run_id": str, "phase": str, "step": int, "name": str,
                              "value": float, "at": str})
    db["run_metrics"].create_index(["run_id", "phase", "step"])
    db["reward_models"].create({
        "id": str, "parent_id": str, "run_id": str, "path": str, "accuracy": float,
        "ci_low": float, "ci_high": float, "margin": float, "n_train": int, "n_heldout": int,
        "norm_mean": float, "norm_std": float, "created_at": str}, pk="id")
    db["app_state"].create({"key": str, "value": str, "updated_at": str}, pk="key")
    db["users"].create({"username": str, "password_hash": str, "role": str, "created_at": str},
                       pk="username")
    db["comparisons"].create_index(["excluded"])
    db["ratings"].create_index(["excluded"])


def _m3_reward_model_roles(db: sqlite_utils.Database) -> None:
    """Cross-fitted reward models: 'policy' (optimised by PPO) or 'judge' (used by the gate)."""
    db["reward_models"].add_column("role", str)


MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = [_m1_core, _m2_review_and_training,
                                                            _m3_reward_model_roles]
SCHEMA_VERSION = len(MIGRATIONS)


def connect(path: Path | str, timeout_s: float = 10.0) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit), WAL, busy timeout."""
    conn = sqlite3.connect(str(path), timeout=timeout_s, isolation_level=None, check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout = {int(timeout_s * 1000)}")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("PRAGMA foreign_keys = ON")
    return conn


def migrate(conn: sqlite3.Connection) -> int:
    """Applies the migrations the file has not seen yet, each in its own transaction."""
    db = sqlite_utils.Database(conn)
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise StoreError(f"database schema {version} is newer than this app ({SCHEMA_VERSION}): upgrade the app")
    for number in range(version, SCHEMA_VERSION):
        conn.execute("BEGIN IMMEDIATE")
        try:
            if conn.execute("PRAGMA user_version").fetchone()[0] == number:  # another process may have won
                MIGRATIONS[number](db)
                conn.execute(f"PRAGMA user_version = {number + 1}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    return SCHEMA_VERSION


@dataclass
class Message:
    role: str
    content: str


class FeedbackStore:
    """Python API over the feedback database; no UI code, no training code."""

    def __init__(self, path: Path | str, scrub_pii: bool = True, timeout_s: float = 10.0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.scrub_pii = scrub_pii
        self.timeout_s = timeout_s
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._all_lock = threading.Lock()
        migrate(self.conn)

    # -- connections and transactions ------------------------------------------------------
    @property
    def conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = connect(self.path, self.timeout_s)
            self._local.conn = conn
            with self._all_lock:
                self._all.append(conn)
        return conn

    @property
    def db(self) -> sqlite_utils.Database:
        return sqlite_utils.Database(self.conn)

    @contextmanager
    def transaction(self) -> Iterator[sqlite_utils.Database]:
        """``BEGIN IMMEDIATE``: takes the write lock up front so two writers never deadlock
        on a lock upgrade; everything inside commits together or not at all.  Nested use
        joins the caller's transaction, so a caller can make several store calls atomic."""
        conn = self.conn
        if conn.in_transaction:  # nested: the outer transaction commits or rolls back
            yield sqlite_utils.Database(conn)
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield sqlite_utils.Database(conn)
            conn.execute("COMMIT")
        except BaseException:
            # SQLite may already have rolled back (e.g. SQLITE_FULL): a second ROLLBACK
            # would raise and hide the real error
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def close(self) -> None:
        with self._all_lock:
            for conn in self._all:
                try:
                    conn.close()
                except sqlite3.ProgrammingError:
                    pass
            self._all.clear()
        self._local = threading.local()

    def query(self, sql: str, params: tuple | dict = ()) -> list[dict]:
        cur = self.conn.execute(sql, params)
        cols = [c[0] for c in cur.description]
        return [dict(zip(cols, row)) for row in cur.fetchall()]

    def _clean(self, text: str | None) -> str | None:
        if text is None:
            return None
        return pii.scrub(text) if self.scrub_pii else text

    def _clean_messages(self, messages: list[dict]) -> list[dict]:
        return [{"role": m["role"], "content": self._clean(m["content"])} for m in messages]

    # -- sessions and conversations -----------------------------------------------------------
    def ensure_session(self, session_id: str, user: str | None = None, client: str | None = None) -> None:
        with self.transaction() as db:
            if not db["sessions"].count_where("id = ?", [session_id]):
                db["sessions"].insert({"id": session_id, "user": user, "client": self._clean(client), "opt_out": 0,
                                       "created_at": now(), "updated_at": now()})

    def set_opt_out(self, session_id: str, opt_out: bool, client: str | None = None) -> bool:
        """Recorded per session and read by every later export and training snapshot.
        Writes only when the value changes (a session without a row has the default, opted
        in), so repeating a call costs no write; returns whether anything was written."""
        with self.transaction() as db:
            row = db.execute("SELECT opt_out FROM sessions WHERE id = ?", [session_id]).fetchone()
            if bool(row[0] if row else 0) == bool(opt_out):
                return False
            if row is None:
                self.ensure_session(session_id, client=client)  # joins this transaction
            db["sessions"].update(session_id, {"opt_out": int(opt_out), "updated_at": now()})
        return True

    def session(self, session_id: str) -> dict | None:
        rows = self.query("SELECT * FROM sessions WHERE id = ?", (session_id,))
        return rows[0] if rows else None

    def start_conversation(self, session_id: str, system_prompt: str) -> str:
        conv_id = new_id()
        self.ensure_session(session_id)
        with self.transaction() as db:
            db["conversations"].insert({"id": conv_id, "session_id": session_id,
                                        "system_prompt": self._clean(system_prompt), "created_at": now()})
        return conv_id

    def set_message(self, conversation_id: str, turn: int, role: str, content: str,
                    generation_id: str | None = None) -> None:
        """Writes the kept message at a turn (user or assistant), replacing an older one:
        the conversation table holds the path the user continued on."""
        with self.transaction() as db:
            db.execute("DELETE FROM messages WHERE conversation_id = ? AND turn = ?", [conversation_id, turn])
            db["messages"].insert({"conversation_id": conversation_id, "turn": turn, "role": role,
                                   "content": self._clean(content), "generation_id": generation_id,
                                   "created_at": now()})

    def conversation_messages(self, conversation_id: str) -> list[dict]:
        return self.query("SELECT turn, role, content, generation_id FROM messages "
                          "WHERE conversation_id = ? ORDER BY turn", (conversation_id,))

    # -- generations ----------------------------------------------------------------------------
    def record_generation(self, *, session_id: str, conversation_id: str, turn: int,
                          context: list[dict], content: str, model_version: str, sampling: dict,
                          prompt_tokens: int, completion_tokens: int, ttft_ms: float | None,
                          latency_ms: float | None, finish_reason: str | None) -> str:
        gen_id = new_id()
        with self.transaction() as db:
            db["generations"].insert({
                "id": gen_id, "session_id": session_id, "conversation_id": conversation_id,
                "turn": turn, "context": _json(self._clean_messages(context)),
                "content": self._clean(content), "model_version": model_version,
                "sampling": _json(sampling), "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens, "ttft_ms": ttft_ms, "latency_ms": latency_ms,
                "finish_reason": finish_reason, "created_at": now()})
        return gen_id

    def generation(self, gen_id: str) -> dict:
        rows = self.query("SELECT * FROM generations WHERE id = ?", (gen_id,))
        if not rows:
            raise NotFound(f"no generation {gen_id}")
        return rows[0]

    # -- judgements -------------------------------------------------------------------------------
    def open_comparison(self, *, session_id: str, conversation_id: str, turn: int,
                        a_generation_id: str, b_generation_id: str) -> str:
        """A regenerate made answer B beside answer A; the verdict comes later."""
        a, b = self.generation(a_generation_id), self.generation(b_generation_id)
        if a["session_id"] != session_id or b["session_id"] != session_id:
            raise NotFound("no such answers in this session")
        comp_id = new_id()
        with self.transaction() as db:
            db["comparisons"].insert({
                "id": comp_id, "session_id": session_id, "conversation_id": conversation_id,
                "turn": turn, "context": a["context"], "a_generation_id": a_generation_id,
                "b_generation_id": b_generation_id, "a_text": a["content"], "b_text": b["content"],
                "verdict": None, "source": "regenerate", "created_at": now(), "decided_at": None,
                "excluded": 0})
        return comp_id

    def decide_comparison(self, comparison_id: str, verdict: str, session_id: str) -> dict:
        """Sets the verdict once.  Unknown id, another session's comparison, or one already
        decided: a clear error and no row changed (the UPDATE's WHERE guarantees it)."""
        if verdict not in VERDICTS:
            raise StoreError(f"verdict must be one of {', '.join(VERDICTS)}, not {verdict!r}")
        with self.transaction() as db:
            cur = db.execute("UPDATE comparisons SET verdict = ?, decided_at = ? "
                             "WHERE id = ? AND session_id = ? AND verdict IS NULL",
                             [verdict, now(), comparison_id, session_id])
            if cur.rowcount != 1:
                row = db.execute("SELECT verdict, session_id FROM comparisons WHERE id = ?",
                                 [comparison_id]).fetchone()
                if row is None or row[1] != session_id:
                    raise NotFound(f"no comparison {comparison_id!r} in this session")
                raise AlreadyDecided(f"comparison {comparison_id} was already decided ({row[0]})")
        return self.comparison(comparison_id)

    def record_edit(self, *, session_id: str, conversation_id: str, turn: int, generation_id: str,
                    rewrite: str) -> str:
        """The user's rewrite is stored as preferred over the model's answer (verdict 'edit':
        b_text, the rewrite, is chosen over a_text, the model answer)."""
        gen = self.generation(generation_id)
        if gen["session_id"] != session_id:
            raise NotFound("no such answer in this session")
        comp_id = new_id()
        with self.transaction() as db:
            db["comparisons"].insert({
                "id": comp_id, "session_id": session_id, "conversation_id": conversation_id,
                "turn": turn, "context": gen["context"], "a_generation_id": generation_id,
                "b_generation_id": None, "a_text": gen["content"], "b_text": self._clean(rewrite),
                "verdict": "edit", "source": "edit", "created_at": now(), "decided_at": now(),
                "excluded": 0})
        return comp_id

    def comparison(self, comparison_id: str) -> dict:
        rows = self.query("SELECT * FROM comparisons WHERE id = ?", (comparison_id,))
        if not rows:
            raise NotFound(f"no comparison {comparison_id!r}")
        return rows[0]

    def record_rating(self, *, session_id: str, generation_id: str, thumb: str,
                      reasons: list[str] | None = None, comment: str = "") -> str:
        if thumb not in THUMBS:
            raise StoreError(f"thumb must be 'up' or 'down', not {thumb!r}")
        reasons = list(reasons or [])
        unknown = [r for r in reasons if r not in REASON_TAGS]
        if unknown:  # names a few, shortened: the refusal must not echo a huge request back
            named = ", ".join(repr(r)[:40] for r in unknown[:3]) + (", …" if len(unknown) > 3 else "")
            raise StoreError(f"unknown reason tags [{named}]: use {', '.join(REASON_TAGS)}")
        # each tag once, in the tags' order: a rating row stays small whatever the request
        reasons = [tag for tag in REASON_TAGS if tag in reasons]
        gen = self.generation(generation_id)
        if gen["session_id"] != session_id:
            raise NotFound("no such answer in this session")
        rating_id = new_id()
        with self.transaction() as db:
            db["ratings"].insert({
                "id": rating_id, "session_id": session_id, "conversation_id": gen["conversation_id"],
                "generation_id": generation_id, "turn": gen["turn"], "context": gen["context"],
                "answer_text": gen["content"], "thumb": thumb, "reasons": _json(reasons),
                "comment": self._clean(comment or ""), "created_at": now(), "excluded": 0})
        return rating_id

    def rating(self, rating_id: str) -> dict:
        rows = self.query("SELECT * FROM ratings WHERE id = ?", (rating_id,))
        if not rows:
            raise NotFound(f"no rating {rating_id!r}")
        return rows[0]

    # -- review (maintainers) ------------------------------------------------------------------
    def set_excluded(self, record_type: str, record_ids: list[str], excluded: bool, reason: str,
                     actor: str) -> int:
        """Excludes or restores records in one transaction and logs who, when and why."""
        table = {"comparison": "comparisons", "rating": "ratings"}.get(record_type)
        if table is None:
            raise StoreError("record type must be 'comparison' or 'rating'")
        if excluded and not reason.strip():
            raise StoreError("give a reason for the exclusion")
        changed = 0
        with self.transaction() as db:
            for rid in record_ids:
                cur = db.execute(
                    f"UPDATE {table} SET excluded = ?, exclude_reason = ?, excluded_by = ?, excluded_at = ? "
                    "WHERE id = ?", [int(excluded), reason if excluded else None, actor, now(), rid])
                if cur.rowcount:
                    changed += 1
                    db["review_log"].insert({"record_type": record_type, "record_id": rid,
                                             "action": "exclude" if excluded else "restore",
                                             "reason": reason, "actor": actor, "at": now()})
        return changed

    # -- what training may use -----------------------------------------------------------------
    def usable_comparisons(self, since: str | None = None) -> list[dict]:
        """Decided comparisons a retrain may use: not excluded, not from opted-out sessions,
        verdict set.  Ordered by decision time, then by insertion (``rowid``) for the same
        millisecond: the held-out split relies on this order."""
        sql = ("SELECT c.* FROM comparisons c JOIN sessions s ON s.id = c.session_id "
               "WHERE c.verdict IS NOT NULL AND c.excluded = 0 AND s.opt_out = 0")
        params: list = []
        if since:
            sql += " AND c.decided_at > ?"
            params.append(since)
        return self.query(sql + " ORDER BY c.decided_at, c.rowid", tuple(params))

    def count_new_preferences(self) -> int:
        """Usable ordered preferences that no training run has consumed yet."""
        return self.query(
            "SELECT count(*) AS n FROM comparisons c JOIN sessions s ON s.id = c.session_id "
            "WHERE c.verdict IN ('a', 'b', 'edit') AND c.excluded = 0 AND s.opt_out = 0 "
            "AND c.used_in_run IS NULL")[0]["n"]

    def usable_ratings(self) -> list[dict]:
        return self.query("SELECT r.* FROM ratings r JOIN sessions s ON s.id = r.session_id "
                          "WHERE r.excluded = 0 AND s.opt_out = 0 ORDER BY r.created_at, r.rowid")

    def user_prompts(self) -> list[dict]:
        """Conversation contexts of usable generations: the raw material for rollout and gate
        prompts.  Left out: opted-out sessions, and every answer to a turn whose comparison,
        rewrite or rating a maintainer excluded (same conversation, same context), because
        an excluded record must not reach a retrain in any form, its prompt included."""
        return self.query(
            "SELECT g.session_id, g.context, g.created_at FROM generations g "
            "JOIN sessions s ON s.id = g.session_id WHERE s.opt_out = 0 "
            "AND NOT EXISTS (SELECT 1 FROM comparisons c WHERE c.excluded = 1 "
            "AND c.conversation_id = g.conversation_id AND c.context = g.context) "
            "AND NOT EXISTS (SELECT 1 FROM ratings r WHERE r.excluded = 1 "
            "AND r.conversation_id = g.conversation_id AND r.context = g.context) "
            "ORDER BY g.created_at")

    def answers_of_version(self, version: str, limit: int = 1000) -> list[dict]:
        """The newest answers a model version gave in sessions that allow training (newest
        first), written without a style hint: samples of that policy at the serving settings,
        e.g. for reward normalisation."""
        return self.query("SELECT g.context, g.content, g.created_at FROM generations g "
                          "JOIN sessions s ON s.id = g.session_id WHERE s.opt_out = 0 AND g.model_version = ? "
                          "AND json_extract(g.sampling, '$.style_hint') IS NULL "
                          "ORDER BY g.created_at DESC, g.rowid DESC LIMIT ?", (version, int(limit)))

    # -- key/value state ---------------------------------------------------------------------
    def get_state(self, key: str, default: Any = None) -> Any:
        rows = self.query("SELECT value FROM app_state WHERE key = ?", (key,))
        return json.loads(rows[0]["value"]) if rows else default

    def set_state(self, key: str, value: Any) -> None:
        with self.transaction() as db:
            db["app_state"].upsert({"key": key, "value": _json(value), "updated_at": now()}, pk="key")

    def counts(self) -> dict[str, int]:
        return {t: self.db[t].count for t in ("sessions", "conversations", "generations",
                                               "comparisons", "ratings")}

