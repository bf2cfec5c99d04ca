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
(pairwise verdicts, rankings of more than two answers, and edits), ratings (thumbs), review_log (maintainer actions),
model_versions, serving_log, training_runs, run_metrics, reward_models, app_state, users.

Owners: a browser keeps a random secret key (``secrets.token_urlsafe``, made by the server);
``sessions.owner`` holds its SHA-256 (``owner_hash``), never the key itself, so the list of
a user's past chats, reopening one and "delete my data" are each one query scoped by that
hash, and neither the database nor a copy of it lets anyone act as the browser.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import secrets
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

from feedback import pii, ranking

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


class TooManyChats(StoreError):
    """A browser (owner) already keeps ``max_chats_per_owner`` chats."""


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def new_id() -> str:
    return uuid.uuid4().hex


def _finite(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by None (JSON's null)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _json(value: Any) -> str:
    """Standard JSON, so SQLite's own JSON functions read it too: Python's ``NaN`` (a metric
    that is not a number, e.g. a correlation over two steps) is written as null."""
    return json.dumps(_finite(value), ensure_ascii=False, allow_nan=False)


CONTRIBUTOR_SALT = "contributor_salt"
SERVER_SECRETS = ("browser_storage", CONTRIBUTOR_SALT)
"""``app_state`` keys that are server secrets: the console's copy of the database leaves them out."""


def owner_hash(key: str) -> str:
    """What the database keeps of a browser's secret key: its SHA-256 (hex)."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


# runs whose snapshot went into trained reward models (and, when they passed, a version)
TRAINED_RUN_STATES = ("canary", "promoted", "passed", "rejected")


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


def _m4_owners(db: sqlite_utils.Database) -> None:
    """Past chats per browser: ``sessions.owner`` is the SHA-256 of the browser's secret key
    (``owner_hash``).  Older sessions have none: no browser can list or delete them."""
    db["sessions"].add_column("owner", str)
    db["sessions"].create_index(["owner"])
    db["conversations"].create_index(["session_id"])
    db["generations"].create_index(["session_id"])
    db["ratings"].create_index(["session_id"])
    db["comparisons"].create_index(["b_generation_id"])  # "which answers were a B" (the update notice)


def _m5_rankings_and_branches(db: sqlite_utils.Database) -> None:
    """Rankings of more than two answers ("compare more") and chats branched by an edit.

    A ranking is one comparison row: A and B as before, the extra answers C, D in
    ``extra_answers`` (JSON ``[{label, generation_id, text}]``, written once they are complete)
    and, once decided, verdict ``rank`` with the order in ``ranking`` (JSON tiers, best first:
    ``[["C"], ["A", "D"], ["B"]]``; see ``feedback.ranking``).  So exclusion, exports, opt-out
    and "delete my data" treat it as the comparison record it is.

    A chat branched by editing one of its messages is a new conversation: ``branch_of`` names
    the conversation it was copied from, ``branch_turn`` the turn that was edited."""
    db["comparisons"].add_column("extra_answers", str)
    db["comparisons"].add_column("ranking", str)
    db["conversations"].add_column("branch_of", str)
    db["conversations"].add_column("branch_turn", int)


def _m6_contributors(db: sqlite_utils.Database) -> None:
    """Who contributed a judgement, for the retrain's per-client cap: ``sessions.contributor``
    is a keyed hash (``FeedbackStore.contributor_of``) of the network address the session was
    first stored from.  Older sessions have none; the cap then counts their browser key."""
    db["sessions"].add_column("contributor", str)
    db["sessions"].create_index(["contributor"])


def _m7_chat_titles(db: sqlite_utils.Database) -> None:
    """A title the user chose for a chat (``FeedbackStore.rename_owner_conversation``); None:
    the chat is titled by its first message."""
    db["conversations"].add_column("title", str)


MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = [_m1_core, _m2_review_and_training,
                                                            _m3_reward_model_roles, _m4_owners,
                                                            _m5_rankings_and_branches, _m6_contributors,
                                                            _m7_chat_titles]
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

    # Chats one owner (a browser's key) may keep; a new one past it is refused (TooManyChats) and
    # the list shows all of them, so none drops off it.  0 = no limit.  The app sets it from
    # ``--max-chats-per-browser``.
    max_chats_per_owner: int = 200

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
    def ensure_session(self, session_id: str, user: str | None = None, client: str | None = None,
                       owner: str | None = None, contributor: str | None = None) -> None:
        """Writes the session's row once; ``owner``: ``owner_hash`` of the browser's key;
        ``contributor``: ``contributor_of`` the caller's address."""
        with self.transaction() as db:
            if not db["sessions"].count_where("id = ?", [session_id]):
                db["sessions"].insert({"id": session_id, "user": user, "client": self._clean(client), "opt_out": 0,
                                       "created_at": now(), "updated_at": now(), "owner": owner,
                                       "contributor": contributor})

    def contributor_of(self, address: str | None) -> str | None:
        """What the store keeps of a client's network address: an HMAC-SHA-256 under a secret
        of this database (``CONTRIBUTOR_SALT``, left out of the console's copy), so the same
        address is the same contributor but a copy of the file does not give addresses away
        (a plain hash of an IPv4 address is reversed by trying them all)."""
        if not address:
            return None
        salt = self.get_state(CONTRIBUTOR_SALT)
        if not salt:
            with self.transaction() as db:  # two threads may race: the first salt written wins
                db.execute("INSERT OR IGNORE INTO app_state (key, value, updated_at) VALUES (?, ?, ?)",
                           [CONTRIBUTOR_SALT, _json(secrets.token_hex(16)), now()])
            salt = self.get_state(CONTRIBUTOR_SALT)
        return hmac.new(salt.encode(), address.encode(), hashlib.sha256).hexdigest()[:32]

    def set_opt_out(self, session_id: str, opt_out: bool, client: str | None = None,
                    owner: str | None = None) -> bool:
        """Recorded per session and read by every later export and training snapshot; with
        ``owner``, for every session of that browser too ("my conversations": its past
        chats included).  Writes only when a value changes (a session without a row has the
        default, opted in), so repeating a call costs no write; returns whether anything was
        written."""
        with self.transaction() as db:
            row = db.execute("SELECT opt_out FROM sessions WHERE id = ?", [session_id]).fetchone()
            others = db.execute("UPDATE sessions SET opt_out = ?, updated_at = ? WHERE owner = ? AND id != ? "
                                "AND opt_out != ?", [int(opt_out), now(), owner, session_id, int(opt_out)]
                                ).rowcount if owner else 0
            if bool(row[0] if row else 0) == bool(opt_out):
                return others > 0
            if row is None:
                self.ensure_session(session_id, client=client, owner=owner)  # joins this transaction
            db["sessions"].update(session_id, {"opt_out": int(opt_out), "updated_at": now()})
        return True

    def session(self, session_id: str) -> dict | None:
        rows = self.query("SELECT * FROM sessions WHERE id = ?", (session_id,))
        return rows[0] if rows else None

    def start_conversation(self, session_id: str, system_prompt: str) -> str:
        """A new conversation of the session; TooManyChats when the session's owner already
        keeps ``max_chats_per_owner`` chats (counted in the same write transaction, so two
        windows cannot both take the last place)."""
        conv_id = new_id()
        self.ensure_session(session_id)
        with self.transaction() as db:
            self._refuse_past_chat_cap(session_id)
            db["conversations"].insert({"id": conv_id, "session_id": session_id,
                                        "system_prompt": self._clean(system_prompt), "created_at": now()})
        return conv_id

    def start_branch(self, session_id: str, branch_of: str, branch_turn: int) -> str:
        """A new conversation of the same session, branched from ``branch_of`` (this
        session's) at ``branch_turn``, with its system prompt; the caller writes its messages."""
        rows = self.query("SELECT system_prompt FROM conversations WHERE id = ? AND session_id = ?",
                          (branch_of, session_id))
        if not rows:
            raise NotFound("no such conversation in this session")
        conv_id = new_id()
        with self.transaction() as db:
            self._refuse_past_chat_cap(session_id)
            db["conversations"].insert({"id": conv_id, "session_id": session_id,
                                        "system_prompt": rows[0]["system_prompt"], "created_at": now(),
                                        "branch_of": branch_of, "branch_turn": int(branch_turn)})
        return conv_id

    def owner_chat_count(self, owner: str | None) -> int:
        """How many chats the owner keeps: its conversations that hold a message (what
        ``owner_conversations`` lists)."""
        if not owner:
            return 0
        return self.query("SELECT count(*) AS n FROM conversations c JOIN sessions s ON s.id = c.session_id "
                          "WHERE s.owner = ? AND EXISTS (SELECT 1 FROM messages m WHERE m.conversation_id = c.id)",
                          (owner,))[0]["n"]

    def check_room_for_chat(self, owner: str | None) -> None:
        """TooManyChats when the owner already keeps ``max_chats_per_owner`` chats (a caller
        may ask before it does the work a new chat costs; the store asks again when it starts one)."""
        cap = int(self.max_chats_per_owner or 0)
        if cap > 0 and owner and self.owner_chat_count(owner) >= cap:
            raise TooManyChats(f"you already have {cap} chats, the most this server keeps for one browser: "
                               "continue one of them from \"Your chats\", or delete your data to start afresh")

    def _refuse_past_chat_cap(self, session_id: str) -> None:
        rows = self.query("SELECT owner FROM sessions WHERE id = ?", (session_id,))
        self.check_room_for_chat(rows[0]["owner"] if rows else None)

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

    # -- a browser's own chats: every query is scoped by the owner hash -------------------------
    def owner_conversations(self, owner: str, limit: int | None = None) -> list[dict]:
        """The owner's conversations that hold a message, most recently active first: id,
        title (the first user message), renamed (the title the user chose, or None), created_at, updated_at (latest message), messages,
        branch_of (the conversation an edit branched it from, if any).  ``limit`` None: all of
        them, as the cap (``max_chats_per_owner``) refuses more; at least 200 are shown when
        the cap was lowered below what a browser already kept."""
        if not owner:
            return []
        if limit is None:
            limit = max(int(self.max_chats_per_owner), 200) if self.max_chats_per_owner else -1
        return self.query(
            "SELECT c.id, c.created_at, c.branch_of, c.title AS renamed, "
            "(SELECT m.content FROM messages m WHERE m.conversation_id = c.id AND m.role = 'user' "
            "ORDER BY m.turn LIMIT 1) AS title, "
            "(SELECT max(m.created_at) FROM messages m WHERE m.conversation_id = c.id) AS updated_at, "
            "(SELECT count(*) FROM messages m WHERE m.conversation_id = c.id) AS messages "
            "FROM conversations c JOIN sessions s ON s.id = c.session_id "
            "WHERE s.owner = ? AND EXISTS (SELECT 1 FROM messages m WHERE m.conversation_id = c.id) "
            "ORDER BY updated_at DESC, c.rowid DESC LIMIT ?", (owner, int(limit)))

    def owner_branch_family(self, owner: str, conversation_id: str) -> tuple[int, list[str]] | None:
        """The versions of one edited message around ``conversation_id`` (the owner's): the
        edited turn and [the chat it was branched from, then its branches at that turn, oldest
        first].  For a chat that was never branched, its latest branch's turn; None when the
        chat has no branches and is none."""
        if not owner:
            return None
        mine = "c.session_id IN (SELECT id FROM sessions WHERE owner = ?)"
        rows = self.query(f"SELECT c.branch_of, c.branch_turn FROM conversations c WHERE c.id = ? AND {mine}",
                          (conversation_id, owner))
        if not rows:
            return None
        root, turn = rows[0]["branch_of"], rows[0]["branch_turn"]
        if root is None:
            latest = self.query(f"SELECT c.branch_turn FROM conversations c WHERE c.branch_of = ? AND {mine} "
                                "ORDER BY c.rowid DESC LIMIT 1", (conversation_id, owner))
            if not latest:
                return None
            root, turn = conversation_id, latest[0]["branch_turn"]
        branches = self.query(f"SELECT c.id FROM conversations c WHERE c.branch_of = ? AND c.branch_turn = ? "
                              f"AND {mine} AND EXISTS (SELECT 1 FROM messages m WHERE m.conversation_id = c.id) "
                              "ORDER BY c.rowid", (root, turn, owner))
        return int(turn), [root] + [b["id"] for b in branches]

    def owner_conversation(self, owner: str, conversation_id: str) -> dict:
        """One of the owner's conversations (id, session_id, system_prompt, opt_out) with its
        kept messages, each assistant answer with the context and model version of the
        generation that wrote it (none for a user's rewrite).  Any conversation that is not
        the owner's is NotFound, exactly like one that does not exist."""
        rows = self.query("SELECT c.id, c.session_id, c.system_prompt, s.opt_out FROM conversations c "
                          "JOIN sessions s ON s.id = c.session_id WHERE c.id = ? AND s.owner = ?",
                          (conversation_id, owner)) if owner else []
        if not rows:
            raise NotFound("no such conversation")
        conv = rows[0]
        conv["messages"] = self.query(
            "SELECT m.turn, m.role, m.content, m.generation_id, g.context, g.model_version "
            "FROM messages m LEFT JOIN generations g ON g.id = m.generation_id "
            "WHERE m.conversation_id = ? ORDER BY m.turn", (conversation_id,))
        return conv

    def owner_opted_out(self, owner: str) -> bool:
        """The opt-out of the owner's most recently changed session (False when none)."""
        rows = self.query("SELECT opt_out FROM sessions WHERE owner = ? ORDER BY updated_at DESC, rowid DESC "
                          "LIMIT 1", (owner,)) if owner else []
        return bool(rows and rows[0]["opt_out"])

    def owner_last_version(self, owner: str) -> str | None:
        """The model version of the owner's newest answer that was not an answer B (B may
        come from a candidate on trial): the version this user last chatted with."""
        if not owner:
            return None
        rows = self.query("SELECT g.model_version FROM generations g JOIN sessions s ON s.id = g.session_id "
                          "WHERE s.owner = ? AND NOT EXISTS (SELECT 1 FROM comparisons c "
                          "WHERE c.b_generation_id = g.id) ORDER BY g.created_at DESC, g.rowid DESC LIMIT 1",
                          (owner,))
        return rows[0]["model_version"] if rows else None

    def conversation_length(self, conversation_id: str) -> int:
        """How many messages the conversation keeps (0 when it was deleted)."""
        return self.query("SELECT count(*) AS n FROM messages WHERE conversation_id = ?", (conversation_id,))[0]["n"]

    def delete_owner_data(self, owner: str) -> dict:
        """Deletes for good every row recorded for the owner's sessions: sessions,
        conversations, messages, generations, comparisons (votes, rewrites), ratings, and the
        review log of those records; tables are found by their ``session_id`` /
        ``conversation_id`` columns, so tables added later are covered too.  Deleted bytes
        are overwritten (``secure_delete``).  Exports and training snapshots read these
        tables, so nothing deleted reaches them again.

        Returns what was deleted and what training had already used before: ``used``, the
        judgements that were in the snapshot of a run that trained on them (``training_runs``
        ``data`` record_ids / rating_ids, or ``comparisons.used_in_run``), with those runs'
        versions; and ``versions_since``, the versions trained after the owner's first answer
        was written (their rollout prompts came from the log, which runs record only on disk,
        so that is the closest record of whether a prompt was practised on)."""
        if not owner:
            raise StoreError("no owner given")
        mine_s = "SELECT id FROM sessions WHERE owner = ?"
        mine_c = f"SELECT id FROM conversations WHERE session_id IN ({mine_s})"
        self.conn.execute("PRAGMA secure_delete = ON")
        try:
            with self.transaction() as db:
                def ids(sql: str, *more: str) -> list[str]:
                    return [r[0] for r in db.execute(sql, [owner, *more])]

                comparisons = set(ids(f"SELECT id FROM comparisons WHERE session_id IN ({mine_s}) "
                                      "AND verdict IS NOT NULL"))
                ratings = set(ids(f"SELECT id FROM ratings WHERE session_id IN ({mine_s})"))
                counted = {
                    "conversations": db.execute(f"SELECT count(*) FROM conversations c WHERE c.id IN ({mine_c}) "
                                                "AND EXISTS (SELECT 1 FROM messages m WHERE m.conversation_id = c.id)",
                                                [owner]).fetchone()[0],
                    "messages": db.execute(f"SELECT count(*) FROM messages WHERE conversation_id IN ({mine_c})",
                                           [owner]).fetchone()[0],
                    "answers": db.execute(f"SELECT count(*) FROM generations WHERE session_id IN ({mine_s})",
                                          [owner]).fetchone()[0],
                    "judgements": len(comparisons) + len(ratings)}
                used: set[str] = set(ids(f"SELECT id FROM comparisons WHERE session_id IN ({mine_s}) "
                                         "AND used_in_run IS NOT NULL")) & comparisons
                used_runs: list[str] = []
                used_versions: list[str] = []
                marks = ",".join("?" * len(TRAINED_RUN_STATES))
                runs = db.execute(f"SELECT id, data, candidate_version FROM training_runs WHERE status IN ({marks}) "
                                  "AND reward_model_id IS NOT NULL ORDER BY created_at", TRAINED_RUN_STATES)
                for run_id, data, version in runs:
                    try:
                        data = json.loads(data or "{}")
                    except ValueError:
                        data = {}
                    hit = (comparisons & set(data.get("record_ids") or [])) | (ratings & set(data.get("rating_ids") or []))
                    hit |= set(ids(f"SELECT id FROM comparisons WHERE session_id IN ({mine_s}) "
                                   "AND used_in_run = ?", run_id))
                    if hit:
                        used |= hit
                        used_runs.append(run_id)
                        if version:
                            used_versions.append(version)
                first = db.execute(f"SELECT min(created_at) FROM generations WHERE session_id IN ({mine_s})",
                                   [owner]).fetchone()[0]
                since = [r[0] for r in db.execute("SELECT id FROM model_versions WHERE run_id IS NOT NULL "
                                                  "AND created_at >= ? ORDER BY created_at", [first])] if first else []

                db.execute("DELETE FROM review_log WHERE (record_type = 'comparison' AND record_id IN "
                           f"(SELECT id FROM comparisons WHERE session_id IN ({mine_s}))) OR (record_type = 'rating' "
                           f"AND record_id IN (SELECT id FROM ratings WHERE session_id IN ({mine_s})))", [owner, owner])
                for table in self._tables_with(db, "conversation_id"):
                    db.execute(f'DELETE FROM "{table}" WHERE conversation_id IN ({mine_c})', [owner])
                for table in self._tables_with(db, "session_id"):
                    db.execute(f'DELETE FROM "{table}" WHERE session_id IN ({mine_s})', [owner])
                db.execute(f"DELETE FROM conversations WHERE session_id IN ({mine_s})", [owner])
                db.execute("DELETE FROM sessions WHERE owner = ?", [owner])
        finally:  # the flag acts when a row is deleted, so it can go off before the commit
            self.conn.execute("PRAGMA secure_delete = OFF")
        return {**counted, "used": len(used), "used_by_runs": used_runs, "used_by_versions": used_versions,
                "versions_since": since}

    def _owned_conversation(self, owner: str, conversation_id: str) -> None:
        """NotFound unless the conversation is the owner's (one of another owner's is
        refused exactly like one that does not exist)."""
        rows = self.query("SELECT 1 FROM conversations c JOIN sessions s ON s.id = c.session_id "
                          "WHERE c.id = ? AND s.owner = ?", (conversation_id, owner)) if owner else []
        if not rows:
            raise NotFound("no such conversation")

    def rename_owner_conversation(self, owner: str, conversation_id: str, title: str | None) -> None:
        """Stores the title the owner chose for one of its chats (None: back to its first
        message); the caller validates the title."""
        self._owned_conversation(owner, conversation_id)
        with self.transaction() as db:
            db.execute("UPDATE conversations SET title = ? WHERE id = ?", [self._clean(title), conversation_id])

    def delete_owner_conversation(self, owner: str, conversation_id: str) -> dict:
        """Deletes for good one of the owner's chats, as ``delete_owner_data`` does all of
        them: its messages, answers, votes, ratings and rewrites (every table with a
        ``conversation_id`` column) and their review log; chats branched from it stay (they
        hold their own copy of the messages) and are no longer marked as its branches.
        Returns the counts deleted (conversations, messages, answers, judgements)."""
        self._owned_conversation(owner, conversation_id)
        one = [conversation_id]
        self.conn.execute("PRAGMA secure_delete = ON")
        try:
            with self.transaction() as db:
                def count(sql: str) -> int:
                    return db.execute(sql, one).fetchone()[0]

                counted = {"conversations": 1 if count("SELECT count(*) FROM messages WHERE conversation_id = ?") else 0,
                           "messages": count("SELECT count(*) FROM messages WHERE conversation_id = ?"),
                           "answers": count("SELECT count(*) FROM generations WHERE conversation_id = ?"),
                           "judgements": count("SELECT count(*) FROM comparisons WHERE conversation_id = ? "
                                               "AND verdict IS NOT NULL")
                           + count("SELECT count(*) FROM ratings WHERE conversation_id = ?")}
                db.execute("DELETE FROM review_log WHERE (record_type = 'comparison' AND record_id IN "
                           "(SELECT id FROM comparisons WHERE conversation_id = ?)) OR (record_type = 'rating' "
                           "AND record_id IN (SELECT id FROM ratings WHERE conversation_id = ?))", one * 2)
                for table in self._tables_with(db, "conversation_id"):
                    db.execute(f'DELETE FROM "{table}" WHERE conversation_id = ?', one)
                db.execute("UPDATE conversations SET branch_of = NULL, branch_turn = NULL WHERE branch_of = ?", one)
                db.execute("DELETE FROM conversations WHERE id = ?", one)
        finally:
            self.conn.execute("PRAGMA secure_delete = OFF")
        return counted

    @staticmethod
    def _tables_with(db, column: str) -> list[str]:
        """The tables (but sessions and conversations) that have ``column``."""
        names = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name "
                                          "NOT LIKE 'sqlite_%' AND name NOT IN ('sessions', 'conversations')")]
        return [n for n in names if column in {r[1] for r in db.execute(f'PRAGMA table_info("{n}")')}]

    def checkpoint(self) -> None:
        """Copies the write-ahead log into the database file as far as readers allow (after
        a deletion, so the overwritten pages reach the main file soon)."""
        self.conn.execute("PRAGMA wal_checkpoint(PASSIVE)")

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
                             "WHERE id = ? AND session_id = ? AND verdict IS NULL AND extra_answers IS NULL",
                             [verdict, now(), comparison_id, session_id])
            if cur.rowcount != 1:
                self._refuse_decision(db, comparison_id, session_id)
                raise StoreError(f"comparison {comparison_id} has more than two answers: rank them")
        return self.comparison(comparison_id)

    @staticmethod
    def _refuse_decision(db, comparison_id: str, session_id: str) -> None:
        """Raises why a comparison cannot be decided: not this session's, or decided already."""
        row = db.execute("SELECT verdict, session_id FROM comparisons WHERE id = ?", [comparison_id]).fetchone()
        if row is None or row[1] != session_id:
            raise NotFound(f"no comparison {comparison_id!r} in this session")
        if row[0] is not None:
            raise AlreadyDecided(f"comparison {comparison_id} was already decided ({row[0]})")

    def add_extra_answers(self, comparison_id: str, session_id: str, generation_ids: list[str]) -> list[dict]:
        """"Compare more": the open comparison gets answers C, D, ... (generations of this
        session, written to the comparison's context), once; returns them as stored
        (``[{label, generation_id, text}]``).  The verdict then comes from ``rank_comparison``."""
        comp = self.comparison(comparison_id)
        if comp["session_id"] != session_id:
            raise NotFound(f"no comparison {comparison_id!r} in this session")
        if comp["verdict"] is not None:
            raise AlreadyDecided(f"comparison {comparison_id} was already decided ({comp['verdict']})")
        if comp["extra_answers"] is not None:
            raise StoreError("this comparison has its extra answers already")
        if not 1 <= len(generation_ids) <= len(ranking.LABELS) - 2:
            raise StoreError(f"a comparison takes 1 to {len(ranking.LABELS) - 2} extra answers")
        extras = []
        for label, gen_id in zip(ranking.LABELS[2:], generation_ids):
            gen = self.generation(gen_id)
            if (gen["session_id"], gen["conversation_id"], gen["turn"]) != (session_id, comp["conversation_id"],
                                                                            comp["turn"]):
                raise NotFound("no such answer to this comparison's turn in this session")
            extras.append({"label": label, "generation_id": gen_id, "text": gen["content"]})
        with self.transaction() as db:
            cur = db.execute("UPDATE comparisons SET extra_answers = ? WHERE id = ? AND session_id = ? "
                             "AND verdict IS NULL AND extra_answers IS NULL", [_json(extras), comparison_id, session_id])
            if cur.rowcount != 1:
                raise AlreadyDecided(f"comparison {comparison_id} changed meanwhile")
        return extras

    def rank_comparison(self, comparison_id: str, session_id: str, order: str | list) -> dict:
        """Decides a comparison with extra answers by the user's order of all its answers
        (``feedback.ranking.parse_order``: "C>A=D>B" or tiers): verdict ``rank``, the tiers
        in ``ranking``.  Once, by its own session; an order that does not rank every answer
        exactly once is refused and nothing changes."""
        comp = self.comparison(comparison_id)
        if comp["session_id"] != session_id:
            raise NotFound(f"no comparison {comparison_id!r} in this session")
        extras = ranking.extra_answers(comp)
        if not extras:
            if comp["verdict"] is not None:
                raise AlreadyDecided(f"comparison {comparison_id} was already decided ({comp['verdict']})")
            raise StoreError("this comparison has two answers: vote on it, or add answers to rank first")
        if isinstance(order, list) and order and all(isinstance(t, list) for t in order):
            order = ranking.format_order(order)
        try:
            tiers = ranking.parse_order(order, ranking.labels_for(2 + len(extras)))
        except ranking.InvalidOrder as exc:
            raise StoreError(str(exc)) from None
        with self.transaction() as db:
            cur = db.execute("UPDATE comparisons SET verdict = ?, ranking = ?, decided_at = ? "
                             "WHERE id = ? AND session_id = ? AND verdict IS NULL",
                             [ranking.RANK, _json(tiers), now(), comparison_id, session_id])
            if cur.rowcount != 1:
                self._refuse_decision(db, comparison_id, session_id)
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

    def has_rating(self, *, session_id: str, generation_id: str, thumb: str, reasons: list[str],
                   comment: str = "") -> bool:
        """Whether this session already stored this very rating of this answer (a double
        submit, or a retry of one that was stored): same thumb, reasons and comment."""
        rows = self.query("SELECT 1 FROM ratings WHERE session_id = ? AND generation_id = ? AND thumb = ? "
                          "AND reasons = ? AND comment = ? LIMIT 1",
                          (session_id, generation_id, thumb, _json(list(reasons)), self._clean(comment or "")))
        return bool(rows)

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
        verdict set; with the session's ``contributor`` and ``owner`` (for the per-client cap).  Ordered by decision time, then by insertion (``rowid``) for the same
        millisecond: the held-out split relies on this order."""
        sql = ("SELECT c.*, s.contributor, s.owner FROM comparisons c JOIN sessions s ON s.id = c.session_id "
               "WHERE c.verdict IS NOT NULL AND c.excluded = 0 AND s.opt_out = 0")
        params: list = []
        if since:
            sql += " AND c.decided_at > ?"
            params.append(since)
        return self.query(sql + " ORDER BY c.decided_at, c.rowid", tuple(params))

    def count_new_preferences(self) -> int:
        """Usable ordered preferences (votes, rewrites, rankings) that no training run has consumed yet."""
        return self.query(
            "SELECT count(*) AS n FROM comparisons c JOIN sessions s ON s.id = c.session_id "
            "WHERE c.verdict IN ('a', 'b', 'edit', 'rank') AND c.excluded = 0 AND s.opt_out = 0 "
            "AND c.used_in_run IS NULL")[0]["n"]

    def usable_ratings(self) -> list[dict]:
        return self.query("SELECT r.*, s.contributor, s.owner FROM ratings r JOIN sessions s ON s.id = r.session_id "
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

    def answer_pairs_of_version(self, version: str) -> list[dict]:
        """Every pair of answers a regenerate put side by side (decided or not) where both came
        from ``version``: context, a_text, b_text, in the order they were shown.  Samples of
        one policy, two per prompt, whatever the vote said: a pool any taste can relabel."""
        return self.query("SELECT c.context, c.a_text, c.b_text FROM comparisons c "
                          "JOIN generations ga ON ga.id = c.a_generation_id "
                          "JOIN generations gb ON gb.id = c.b_generation_id "
                          "WHERE ga.model_version = ? AND gb.model_version = ? ORDER BY c.rowid", (version, version))

    def answers_of_version(self, version: str, limit: int = 1000) -> list[dict]:
        """The newest answers a model version gave in sessions that allow training (newest
        first), written without a style hint: samples of that policy at the serving settings,
        e.g. for reward normalisation."""
        return self.query("SELECT g.context, g.content, g.finish_reason, g.created_at FROM generations g "
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

