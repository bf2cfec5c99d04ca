"""The chat service: everything the end-user UI does, as plain Python (no Gradio here).

One ``ChatSession`` per browser session (the UI keeps it in ``gr.State``, so it lives on the
server and a client cannot forge or read another one): the anonymous session id, the kept
conversation, the open comparison.  Every store call passes that session id, and the store
refuses ids from other sessions, so no call can touch another user's rows.

Conversation turns are 0-based positions in ``ChatSession.messages`` (the system prompt is
not a turn): user at 0, assistant at 1, user at 2 ...; a generation, comparison or edit
carries the turn of the assistant answer it concerns.

Nothing is written for a message that is refused (empty, too long, over the context, rate
limited, engine error): validation and the fit check run before the first write, and the
answer's rows are written only once it is complete, so a failure leaves the conversation
as it was and usable.

One session's calls change its state one at a time (``SessionLocks``): each call checks
and changes the session and its rows under that session's lock.  An answer is streamed
outside the lock, but the session counts as generating from its start until its rows are
stored, and calls that would change the conversation meanwhile (vote, edit, regenerate,
another message, new chat) are refused; ratings and opt-outs are not (``ChatSession.writing``
says which answer is being written, so the page can show it).  The same rating of the same
answer twice (a double submit, or a retry of one that was stored) is refused as a duplicate.

Rankings ("compare more"): an open comparison of A and B can get two more answers, C and D,
written one after the other to the same context (one decoding slot, like a regenerate) and
stored with the comparison once both are complete; the user then ranks all four (``rank``;
equal ranks allowed, see ``feedback.ranking``), one judgement, and the best continues the
chat.  While four answers are open the A/B verdict is refused.

Edit in place (``edit_message``): editing the latest answer is a rewrite (``edit``);
editing an earlier answer or any user message *branches* the chat: a new conversation of the
same session with the messages before the edited one copied, then the edited one (and, for a
user message, a new answer to it).  The original chat and its judgements stay as they were
and both are listed among the browser's chats.

Past chats: every session belongs to a browser's secret key (``ChatSession.key``), made here
with ``secrets.token_urlsafe`` and kept by the browser; the store records only its hash.
Listing, reopening and deleting go through the store's owner-scoped queries with the key of
the caller's own session, never with an id or key the caller merely names, so no call can
reach another key's chats.  Reopening a chat continues it in the session that wrote it (so a
conversation's rows always belong to one session).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import re
import secrets
import sqlite3
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from assistant.engine import Busy, ContextTooLong, Engine, Request, SamplingParams, TextStream
from assistant.holder import ModelHolder
from assistant.settings import Settings
from feedback import ranking
from feedback.registry import Registry
from feedback.store import REASON_TAGS, THUMBS, VERDICTS, FeedbackStore, NotFound, StoreError, owner_hash

log = logging.getLogger(__name__)

VERDICT_TEXT = {"a": "A is better", "b": "B is better", "tie": "tie (A is kept)",
                "both_bad": "both are bad (A is kept; regenerate again or rewrite it)"}
MAX_NEW_TOKENS_LIMIT = 4096
MAX_SEED = 2**64 - 1  # torch generators take unsigned 64-bit seeds; a larger one fails in the engine
# lone UTF-16 surrogates cannot be encoded as UTF-8, so SQLite (and the tokenizer) refuse them
_SURROGATE = re.compile("[\ud800-\udfff]")
# what ``new_key`` makes: 32 random bytes, URL-safe base64 without padding
_KEY = re.compile(r"[A-Za-z0-9_-]{43}")
TITLE_CHARS = 60
MAX_TITLE_CHARS = 200  # a name the user gives a chat (the list shows TITLE_CHARS of it)


def new_key() -> str:
    """A browser's secret key: random, never derived from anything the client sends."""
    return secrets.token_urlsafe(32)


def valid_key(key: object) -> bool:
    """Whether ``key`` has the form of a key ``new_key`` makes (anything else is replaced)."""
    return isinstance(key, str) and _KEY.fullmatch(key) is not None


def chat_title(text: str | None, branch: bool = False) -> str:
    """A chat's one-line title: its first message, shortened; a chat branched by an edit
    says so (" (edited)"), since it may start like the chat it came from."""
    suffix = " (edited)" if branch else ""
    limit = TITLE_CHARS - len(suffix)
    line = " ".join((text or "").split())
    return ((line[:limit - 1].rstrip() + "…") if len(line) > limit else (line or "Untitled chat")) + suffix


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


class ChatError(Exception):
    """A refusal whose message is meant for the user; nothing was stored."""


class RateLimited(ChatError):
    pass


def check_text(text: object, what: str) -> str:
    """Refuses what cannot be stored verbatim: non-text and unpaired surrogates (NUL bytes,
    markup and any other valid Unicode are stored as they are)."""
    if not isinstance(text, str):
        raise ChatError(f"the {what} must be text")
    if _SURROGATE.search(text):
        raise ChatError(f"the {what} contains invalid characters (unpaired UTF-16 surrogates); "
                        "nothing was stored")
    return text


def reason_tags(reasons: object) -> list[str]:
    """A rating's reasons as each known tag once, in the tags' order: an API client may send
    a list of any length with repeats, and the row must stay small.  Unknown tags are
    refused (not dropped: the user meant something), naming a few, shortened, so the
    refusal does not echo a huge request back."""
    if reasons is None:
        return []
    if not isinstance(reasons, (list, tuple)):
        raise ChatError(f"reasons must be a list; choose from: {', '.join(REASON_TAGS)}")
    unknown = [r for r in reasons if r not in REASON_TAGS]
    if unknown:
        named = ", ".join(repr(r)[:40] for r in unknown[:3]) + (", …" if len(unknown) > 3 else "")
        raise ChatError(f"unknown reasons [{named}]; choose from: {', '.join(REASON_TAGS)}")
    return [tag for tag in REASON_TAGS if tag in reasons]


def database_error_message(exc: sqlite3.Error) -> str:
    text = str(exc).lower()
    if "locked" in text or "busy" in text:
        return ("the feedback database is busy (another process is writing to it); nothing was "
                "stored, please try again in a moment")
    if "full" in text:
        return "the server's disk is full; nothing was stored, please tell the maintainers"
    return f"the feedback database failed ({exc}); nothing was stored, please try again"


# ----------------------------------------------------------------------------- session state
@dataclass
class Comparison:
    id: str
    turn: int
    a_generation_id: str
    b_generation_id: str
    a_text: str
    b_text: str
    verdict: str | None = None
    # "compare more": answers C, D once complete ({"label", "generation_id", "text"})
    extras: list[dict] = field(default_factory=list)
    # opened while a candidate was on trial (the live canary): until the vote, nothing shown
    # or returned says which version wrote which answer, whether or not B is the candidate's
    blind: bool = False
    winner: str = ""  # the label that continues the chat, once decided ("A" for a tie or both bad)

    def texts(self) -> dict[str, str]:
        """label -> answer text, A and B first."""
        return {"A": self.a_text, "B": self.b_text, **{e["label"]: e["text"] for e in self.extras}}

    def generation_ids(self) -> dict[str, str]:
        return {"A": self.a_generation_id, "B": self.b_generation_id,
                **{e["label"]: e["generation_id"] for e in self.extras}}


@dataclass
class ChatSession:
    session_id: str
    conversation_id: str | None = None
    # kept path: {"role", "content", "generation_id" (model answer at that turn), "edited",
    #             "context" (what the model saw, for assistant turns)}
    messages: list[dict] = field(default_factory=list)
    comparison: Comparison | None = None
    opt_out: bool = False
    model_version: str = ""
    finish_reason: str | None = None  # of the latest generation
    client: str | None = None  # user agent, recorded with the session row
    address: str | None = None  # the caller's network address, as of its latest call
    key: str | None = field(default=None, repr=False)  # the browser's secret (``new_key``)
    seen_version: str | None = None  # the served version this user last chatted with
    update_noticed: bool = False  # the "assistant was updated" notice is shown once per session
    notice: str = ""  # that notice, until the UI takes it (``ChatService.take_notice``)
    system_prompt: str | None = None  # the conversation's, as stored (a branch copies it)
    # what is being written now: "" (nothing), "answer" (a reply or an edit's), "B" (a
    # regenerate), "C" or "D" (compare more); set with the claim, cleared with its release
    writing: str = ""
    utc_offset: int = 0  # the browser's clock, minutes east of UTC (the chat list's date groups)

    @property
    def owner(self) -> str | None:
        """What the store keeps of the key (``owner_hash``)."""
        return owner_hash(self.key) if self.key else None

    @property
    def client_key(self) -> str:
        """Whom limits and fair scheduling count this session against: its address, since a
        new session is one page load away (the session itself only when the address is unknown)."""
        return f"address {self.address}" if self.address else f"session {self.session_id}"

    def history(self) -> list[dict]:
        """The conversation as Chatbot messages."""
        return [{"role": m["role"], "content": m["content"]} for m in self.messages]

    @property
    def shown_version(self) -> str:
        """The model version the page and the API may show: none while a blind comparison
        (``Comparison.blind``) waits for its vote, else the latest answer's."""
        if self.comparison is not None and self.comparison.blind and self.comparison.verdict is None:
            return ""
        return self.model_version

    def answer_turns(self) -> list[int]:
        return [i for i, m in enumerate(self.messages) if m["role"] == "assistant"]

    def answer_turn(self, number: int) -> int:
        """Answer ``number`` (1-based; 0 or negative: the latest) -> its turn."""
        turns = self.answer_turns()
        if not turns:
            raise ChatError("there is no answer yet")
        if number <= 0:
            return turns[-1]
        if number > len(turns):
            raise ChatError(f"there is no answer {number}: this conversation has {len(turns)}")
        return turns[number - 1]

    def answer_number(self, message_index: int) -> int:
        """Chatbot message index -> 1-based answer number."""
        return sum(1 for i in self.answer_turns() if i <= message_index)


# ----------------------------------------------------------------------------- rate limits
class RateLimiter:
    """Sliding window: at most ``limit`` events per ``window_s`` per key (0 = no limit)."""

    def __init__(self, limit: int, window_s: float = 60.0, clock: Callable[[], float] = time.monotonic):
        self.limit = limit
        self.window_s = window_s
        self.clock = clock
        self._events: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def hit(self, key: str, what: str) -> None:
        if self.limit <= 0:
            return
        now = self.clock()
        with self._lock:
            events = self._events.setdefault(key, deque())
            while events and events[0] <= now - self.window_s:
                events.popleft()
            if len(events) >= self.limit:
                wait = max(1, int(events[0] + self.window_s - now + 0.999))
                raise RateLimited(f"too many {what}: at most {self.limit} per minute; try again in {wait} s")
            events.append(now)
            if len(self._events) > 10_000:  # forget idle sessions
                for k in [k for k, v in self._events.items() if not v or v[-1] <= now - self.window_s]:
                    del self._events[k]


# ----------------------------------------------------------------------------- one session at a time
class _Lock:
    """A lock that can be weakly referenced (``threading.Lock`` cannot)."""
    __slots__ = ("lock", "__weakref__")

    def __init__(self):
        self.lock = threading.Lock()


class SessionLocks:
    """One lock per session id, so two calls of one session (a vote during an answer, an edit
    racing a regenerate) change its state and its rows one after the other, while other
    sessions never wait.  A lock lives while a thread holds or waits for it (a weak map),
    so idle sessions cost nothing."""

    def __init__(self):
        self._locks: weakref.WeakValueDictionary[str, _Lock] = weakref.WeakValueDictionary()
        self._guard = threading.Lock()

    @contextmanager
    def hold(self, session_id: str) -> Iterator[None]:
        with self._guard:
            held = self._locks.get(session_id)
            if held is None:
                held = self._locks[session_id] = _Lock()
        with held.lock:  # ``held`` keeps the entry alive until this block ends
            yield


# ----------------------------------------------------------------------------- the service
@dataclass
class Answer:
    """One finished generation, as streamed to the user."""
    text: str
    version: str
    request: Request
    style_hint: str | None = None

    @property
    def finish_reason(self) -> str | None:
        return self.request.finish_reason


@dataclass
class Running:
    """A generation handed to an engine for one session (the session counts as generating
    until its rows are stored or it failed)."""
    version: str
    engine: Engine
    request: Request
    style_hint: str | None = None


def sampling(temperature: float | None, top_p: float | None, max_new_tokens: float | None,
             seed: float | None, defaults: Settings) -> SamplingParams:
    """Validates sampling settings from the UI or an API client (which may send anything)."""
    try:
        t = defaults.temperature if temperature is None else float(temperature)
        p = defaults.top_p if top_p is None else float(top_p)
        n = defaults.max_new_tokens if max_new_tokens is None else int(max_new_tokens)
        s = None if seed is None or int(seed) < 0 else int(seed)
    except (TypeError, ValueError, OverflowError):
        raise ChatError("temperature, top-p, max new tokens and seed must be numbers") from None
    if not 0 <= t <= 2:
        raise ChatError("temperature must be between 0 and 2")
    if not 0 < p <= 1:
        raise ChatError("top-p must be above 0 and at most 1")
    if not 1 <= n <= MAX_NEW_TOKENS_LIMIT:
        raise ChatError(f"max new tokens must be between 1 and {MAX_NEW_TOKENS_LIMIT}")
    if s is not None and s > MAX_SEED:  # refused, not clamped: two seeds must not silently give one answer
        raise ChatError("the seed must be at most 2^64 - 1 (-1 = random)")
    return SamplingParams(temperature=t, top_p=p, max_new_tokens=n, seed=s)


# Hidden hints for answer B of a regenerate (--regenerate-style-hints), meant to make the two
# answers differ in what users care about; measured in docs/rlhf.md (no gain with the
# embedded 135M model, hence off by default).
STYLE_HINTS = ("Answer briefly.", "Answer in detail.", "Answer with a bulleted list.",
               "Answer in plain prose, no lists.")


def with_style_hint(context: list[dict], hint: str | None) -> list[dict]:
    """``context`` with ``hint`` added to its system prompt (one is added when there is none)."""
    if not hint:
        return context
    if context and context[0]["role"] == "system":
        first = {**context[0], "content": f"{context[0]['content'].rstrip()} {hint}".strip()}
        return [first, *context[1:]]
    return [{"role": "system", "content": hint}, *context]


class ChatService:
    def __init__(self, settings: Settings, store: FeedbackStore, holder: ModelHolder,
                 clock: Callable[[], float] = time.monotonic):
        self.settings = settings
        self.store = store
        self.holder = holder
        self.message_limit = RateLimiter(settings.rate_messages_per_minute, clock=clock)
        self.vote_limit = RateLimiter(settings.rate_votes_per_minute, clock=clock)
        # all keyed by the client (its address), not the session: a new session is one page load away
        self.opt_out_limit = RateLimiter(settings.rate_votes_per_minute, clock=clock)
        self._active: dict[str, Request] = {}  # session id -> the request generating now
        self._rng = random.Random()
        self._lock = threading.Lock()
        self._sessions = SessionLocks()

    def _serialised(self, sess: ChatSession):
        """Held while a call checks and changes one session's state and rows, so each change
        is atomic for that session (the streaming of an answer runs outside it)."""
        return self._sessions.hold(sess.session_id)

    @contextmanager
    def _storing(self):
        """All rows of one step in one transaction; a database failure (locked past the
        busy timeout, disk full) rolls all of them back and becomes a refusal for the user."""
        try:
            with self.store.transaction():
                yield
        except sqlite3.Error as exc:
            log.warning("store write failed, nothing stored: %s", exc)
            raise ChatError(database_error_message(exc)) from None

    # -- sessions -------------------------------------------------------------------------
    def new_session(self, client: str | None = None, address: str | None = None,
                    key: str | None = None) -> ChatSession:
        """A fresh anonymous session; its id is random and never derived from the client.
        ``key``: the browser's key (``attach``); an API client's session gets a new one."""
        return ChatSession(session_id=uuid.uuid4().hex, client=client, address=address, key=key or new_key())

    def attach(self, state: ChatSession | None, key: object, client: str | None = None,
               address: str | None = None) -> ChatSession:
        """The page's session, bound to the key its browser keeps: one this server made
        before, or a new one when the browser has none or sends anything that is not such
        a key (so no client picks a weak key).  A session bound to another key is replaced
        by a fresh one: a session's rows always belong to one key.  Prepares the
        "assistant was updated" notice for a returning user; a browser that opted out stays
        opted out."""
        key = key if valid_key(key) else new_key()
        sess = self.session(state, client, address)
        if sess.key != key:
            if self.generating(sess):
                raise ChatError("an answer is still being written: wait for it or press Stop")
            sess = self.new_session(client, address, key)
            if self.store.owner_opted_out(sess.owner):  # the browser's choice holds for the new page
                with self._storing():
                    self.store.set_opt_out(sess.session_id, True, client=client, owner=sess.owner)
                sess.opt_out = True
        if sess.seen_version is None:
            sess.seen_version = self.store.owner_last_version(sess.owner)
        self._note_version(sess, self.holder.version)
        return sess

    def session(self, state: ChatSession | None, client: str | None = None,
                address: str | None = None) -> ChatSession:
        """The caller's session, created on its first call (its row is written with its
        first stored message or opt-out, so refused calls leave no rows).  ``address``: the
        caller's network address for this call, which limits count against."""
        if not isinstance(state, ChatSession):
            return self.new_session(client, address)
        if address:
            state.address = address
        return state

    def new_chat(self, sess: ChatSession) -> str:
        with self._serialised(sess):
            self._refuse_while_generating(sess)
            sess.conversation_id = None
            sess.messages = []
            sess.comparison = None
            sess.system_prompt = None
        return "New chat started."

    def set_opt_out(self, sess: ChatSession, opt_out: bool) -> str:
        """Rate-limited per client (``ChatSession.client_key``); the store writes only when
        the value changes."""
        if not isinstance(opt_out, bool):  # an API client may send "false", which is truthy
            raise ChatError("opt-out must be true or false")
        self.opt_out_limit.hit(sess.client_key, "opt-out requests")
        with self._serialised(sess):
            with self._storing():
                self.store.set_opt_out(sess.session_id, opt_out, client=sess.client, owner=sess.owner)
            sess.opt_out = opt_out
        if sess.opt_out:
            return "Recorded: your conversations will not be used for training."
        return "Recorded: your conversations may be used for training."

    # -- past chats (the browser's key) ---------------------------------------------------------
    def conversations(self, sess: ChatSession) -> list[dict]:
        """This browser's chats, most recently active first: id, title (shortened for the list),
        updated_at, messages, branch_of (the chat an edit branched it from, or None), renamed
        (whether the user named it) and name (the user's name for it or its first message,
        unshortened up to ``MAX_TITLE_CHARS``, as the rename box starts with it)."""
        return [{"id": c["id"], "title": chat_title(c["renamed"] or c["title"], branch=bool(c["branch_of"])),
                 "updated_at": c["updated_at"], "messages": c["messages"], "branch_of": c["branch_of"],
                 "renamed": c["renamed"] is not None,
                 "name": " ".join((c["renamed"] or c["title"] or "").split())[:MAX_TITLE_CHARS]}
                for c in self.store.owner_conversations(sess.owner)]

    def rename_conversation(self, sess: ChatSession, conversation_id: str, title: str) -> str:
        """Gives one of this browser's chats the title the user chose ("" gives it back its
        first message's); the chat list shows it, shortened as any title is."""
        if not isinstance(title, str) or len(title) > MAX_TITLE_CHARS:
            raise ChatError(f"a chat's name is at most {MAX_TITLE_CHARS} characters")
        line = " ".join(title.split()) or None
        self.vote_limit.hit(sess.client_key, "renames")
        with self._serialised(sess):
            with self._storing():
                try:
                    self.store.rename_owner_conversation(sess.owner, self._chat_id(conversation_id), line)
                except NotFound:
                    raise ChatError("there is no such chat among yours") from None
        return f"Renamed the chat to “{chat_title(line)}”." if line else "The chat is named by its first message again."

    def delete_conversation(self, sess: ChatSession, conversation_id: str, confirm: bool) -> str:
        """Deletes for good one of this browser's chats (``FeedbackStore.delete_owner_conversation``:
        its answers, votes and ratings too); the open chat, if it is that one, becomes a new one.
        Refused while an answer is being written for the session."""
        if confirm is not True:
            raise ChatError("confirm the deletion first: it removes the chat and its votes for good")
        conversation_id = self._chat_id(conversation_id)
        with self._serialised(sess):
            self._refuse_while_generating(sess)
            self.vote_limit.hit(sess.client_key, "deletions")
            with self._storing():
                try:
                    result = self.store.delete_owner_conversation(sess.owner, conversation_id)
                except NotFound:
                    raise ChatError("there is no such chat among yours") from None
            if sess.conversation_id == conversation_id:
                sess.conversation_id, sess.messages, sess.comparison, sess.system_prompt = None, [], None, None
        votes = f" and {plural(result['judgements'], 'vote')}" if result["judgements"] else ""
        return f"Deleted the chat for good ({plural(result['messages'], 'message')}{votes})."

    @staticmethod
    def _chat_id(conversation_id: object) -> str:
        if not isinstance(conversation_id, str) or not conversation_id.strip() or len(conversation_id) > 100:
            raise ChatError("choose one of your chats")
        return conversation_id

    def open_conversation(self, sess: ChatSession, conversation_id: str) -> str:
        """Reopens one of this browser's chats to continue it: the session switches to the
        one that wrote it (its opt-out included); the open comparison, if any, is left."""
        conversation_id = self._chat_id(conversation_id)
        with self._serialised(sess):
            self._refuse_while_generating(sess)
            try:
                conv = self.store.owner_conversation(sess.owner, conversation_id)
            except NotFound:
                raise ChatError("there is no such chat among yours") from None
            messages = []
            for i, m in enumerate(conv["messages"]):
                role = "user" if i % 2 == 0 else "assistant"
                if (m["turn"], m["role"]) != (i, role):
                    raise ChatError("this chat is incomplete and cannot be continued; start a new chat")
                entry = {"role": role, "content": m["content"], "generation_id": m["generation_id"],
                         "edited": role == "assistant" and not m["generation_id"]}
                if role == "assistant" and m["generation_id"]:
                    entry["context"] = json.loads(m["context"])
                messages.append(entry)
            if not messages or messages[-1]["role"] != "assistant":
                raise ChatError("this chat is incomplete and cannot be continued; start a new chat")
            sess.session_id, sess.conversation_id = conv["session_id"], conv["id"]
            sess.messages, sess.comparison, sess.opt_out = messages, None, bool(conv["opt_out"])
            sess.system_prompt = conv["system_prompt"]
            sess.model_version = next((m["model_version"] for m in reversed(conv["messages"]) if m["model_version"]), "")
            sess.finish_reason = None
        return "Reopened the chat: continue where you left off."

    def branches(self, sess: ChatSession) -> tuple[int, list[str]] | None:
        """The current chat's versions of its edited message (``FeedbackStore.owner_branch_family``):
        the edited turn and the chats' ids, the original first; None when there are none."""
        if sess.conversation_id is None:
            return None
        family = self.store.owner_branch_family(sess.owner, sess.conversation_id)
        return family if family and len(family[1]) > 1 and sess.conversation_id in family[1] else None

    def delete_my_data(self, sess: ChatSession, confirm: bool) -> str:
        """Deletes for good every chat, answer, vote, rating and rewrite stored for this
        browser's key (all its sessions), so no later export or training snapshot has them;
        says how many and what earlier training had already used.  The key stays: later chats
        are listed and deletable as before; an opt-out stays in force."""
        if confirm is not True:
            raise ChatError("confirm the deletion first: it removes all your chats and votes for good")
        with self._serialised(sess):
            self._refuse_while_generating(sess)
            self.vote_limit.hit(sess.client_key, "deletions")
            with self._storing():
                result = self.store.delete_owner_data(sess.owner)
                if sess.opt_out:
                    self.store.set_opt_out(sess.session_id, True, client=sess.client, owner=sess.owner)
            sess.conversation_id, sess.messages, sess.comparison = None, [], None
        try:
            self.store.checkpoint()
        except sqlite3.Error as exc:  # the rows are deleted; the log is copied later anyway
            log.info("checkpoint after a deletion skipped: %s", exc)
        return self.deleted_note(result)

    @staticmethod
    def deleted_note(result: dict) -> str:
        chats, judgements = result["conversations"], result["judgements"]
        if not (chats or judgements or result["answers"]):
            return "There was nothing to delete: no chats or votes of yours are stored."
        parts = [f"{plural(chats, 'chat')} ({plural(result['messages'], 'message')})"] if chats else []
        parts += [plural(judgements, "vote")] if judgements else []
        note = f"Deleted for good: {' and '.join(parts) or plural(result['answers'], 'answer')}."
        if result["used"]:
            versions = result["used_by_versions"]
            where = (f"to train {'version' if len(versions) == 1 else 'versions'} {', '.join(versions)}" if versions
                     else f"in {plural(len(result['used_by_runs']), 'training run')} (no version came of "
                          f"{'it' if len(result['used_by_runs']) == 1 else 'them'})")
            return (f"{note} {result['used']} of {plural(judgements, 'vote')} had already been used {where}; "
                    "what a trained version learned stays in it, but nothing of yours will be used again.")
        since = result["versions_since"]
        if since:
            return (f"{note} None of your votes had been used for training yet; "
                    f"{'version' if len(since) == 1 else 'versions'} {', '.join(since)}, trained since your "
                    "first chat, may have practised on your questions.")
        return f"{note} None of it had been used for training yet."

    # -- the "assistant was updated" notice -------------------------------------------------------
    def _note_version(self, sess: ChatSession, version: str) -> None:
        """Once per session: when ``version`` (served now) is not the one this user last
        chatted with, prepares the notice; then remembers ``version``."""
        if sess.seen_version and version and version != sess.seen_version and not sess.update_noticed:
            sess.notice, sess.update_noticed = self.version_note(version), True
        if version:
            sess.seen_version = version

    def take_notice(self, sess: ChatSession | None) -> str:
        """The pending "assistant was updated" notice ("" when none), shown once."""
        if sess is None:
            return ""
        notice, sess.notice = sess.notice, ""
        return notice

    def version_note(self, version: str) -> str:
        """"The assistant was updated (v3), trained on 212 votes from its users." """
        try:
            row = Registry(self.store).version(version)
            feedback = json.loads(row["feedback"] or "{}")
        except (NotFound, ValueError):
            return f"The assistant was updated ({version})."
        votes = len(feedback.get("comparisons") or []) + len(feedback.get("ratings") or [])
        if row["kind"] == "sft" or not votes:
            return f"The assistant now runs version {version}."
        return f"The assistant was updated ({version}), trained on {plural(votes, 'vote')} from its users."

    # -- generation ---------------------------------------------------------------------------
    def _checked_text(self, text: object, what: str, empty: str) -> str:
        """A user's text for a turn: not empty, at most ``--max-message-chars``, valid text
        (``check_text``); else ChatError saying which."""
        text = text if isinstance(text, str) else ""
        if not text.strip():
            raise ChatError(empty)
        if len(text) > self.settings.max_message_chars:
            raise ChatError(f"the {what} is too long: {len(text)} characters, at most "
                            f"{self.settings.max_message_chars}")
        check_text(text, what)
        return text

    def chat(self, sess: ChatSession, message: str, params: SamplingParams,
             system_prompt: str | None = None) -> Iterator[str]:
        """Streams the answer to a new user message (growing text); at the end the turn is
        stored and kept.  Raises ChatError before anything is stored when refused."""
        message = self._checked_text(message, "message", "type a message first (empty messages are not sent)")
        system = self.settings.system_prompt if system_prompt is None else check_text(system_prompt, "system prompt")
        if len(system) > self.settings.max_message_chars:
            raise ChatError(f"the system prompt is too long: at most {self.settings.max_message_chars} characters")
        with self._serialised(sess):  # the context and the claim on the session, together
            history = [{"role": m["role"], "content": m["content"]} for m in sess.messages]
            context = ([{"role": "system", "content": system}] if system.strip() else []) + history + [
                {"role": "user", "content": message}]
            self._refuse_while_generating(sess)
            self._refuse_if_changed_elsewhere(sess)
            if sess.conversation_id is None:
                self._refuse_past_chat_cap(sess)  # before the answer is written, not after
            self.message_limit.hit(sess.client_key, "messages")
            user_turn = len(sess.messages)
            running = self._start(sess, context, params)
        answer = yield from self._stream(sess, running)
        with self._serialised(sess), self._releasing(sess, running):
            with self._storing():  # the whole turn or nothing
                self._refuse_if_changed_elsewhere(sess)
                if sess.conversation_id is None:
                    self.store.ensure_session(sess.session_id, client=sess.client, owner=sess.owner,
                                              contributor=self.store.contributor_of(sess.address))
                if sess.conversation_id is None:
                    sess.system_prompt = system
                conv = sess.conversation_id or self.store.start_conversation(sess.session_id, system)
                self.store.set_message(conv, user_turn, "user", message)
                gen_id = self._record(sess, conv, user_turn + 1, context, params, answer)
                self.store.set_message(conv, user_turn + 1, "assistant", answer.text, gen_id)
            sess.conversation_id = conv
            sess.comparison = None  # an open comparison on an older turn is left undecided
            sess.messages += [{"role": "user", "content": message, "generation_id": None, "edited": False},
                              {"role": "assistant", "content": answer.text, "generation_id": gen_id,
                               "edited": False, "context": context}]
            sess.model_version, sess.finish_reason = answer.version, answer.finish_reason
            self._note_version(sess, answer.version)

    def regenerate(self, sess: ChatSession, params: SamplingParams) -> Iterator[str]:
        """Streams answer B to the context of the latest answer (A, the kept one) and opens
        a comparison of the two; the verdict comes from ``vote``."""
        with self._serialised(sess):  # the checks and the claim on the session, together
            if not sess.messages or sess.messages[-1]["role"] != "assistant":
                raise ChatError("there is no answer to regenerate yet: send a message first")
            kept = dict(sess.messages[-1])
            if kept["edited"] or not kept.get("generation_id"):
                raise ChatError("the latest answer is your own rewrite; send a new message to continue")
            if sess.comparison is not None and sess.comparison.verdict is None:
                if sess.comparison.extras:
                    raise ChatError("first rank the four answers (1 = best), then regenerate")
                raise ChatError("first say which answer is better (A, B, tie or both bad)")
            self._refuse_while_generating(sess)
            self.message_limit.hit(sess.client_key, "messages")
            turn = len(sess.messages) - 1
            context = kept["context"]
            # answer B: from the candidate on trial (the live canary) in a share of turns, else from
            # the served model, with a hidden style hint when --regenerate-style-hints is on
            trial = self.settings.canary_enabled and self.holder.canary_version is not None
            on_trial = trial and self._rng.random() < self.settings.canary_share
            hint = self._rng.choice(STYLE_HINTS) if self.settings.regenerate_style_hints and not on_trial else None
            running = self._start(sess, with_style_hint(context, hint), params, canary=on_trial, style_hint=hint)
            sess.writing = "B"
        answer = yield from self._stream(sess, running)
        with self._serialised(sess), self._releasing(sess, running):
            with self._storing():  # the context the user saw; the hint is kept with the sampling settings
                b_id = self._record(sess, sess.conversation_id, turn, context, params, answer)
                comp_id = self.store.open_comparison(session_id=sess.session_id,
                                                     conversation_id=sess.conversation_id, turn=turn,
                                                     a_generation_id=kept["generation_id"], b_generation_id=b_id)
            sess.comparison = Comparison(id=comp_id, turn=turn, a_generation_id=kept["generation_id"],
                                         b_generation_id=b_id, a_text=kept["content"], b_text=answer.text,
                                         blind=trial)
            sess.model_version, sess.finish_reason = answer.version, answer.finish_reason

    def stop(self, sess: ChatSession | None) -> bool:
        """Cancels this session's running generation in the engine (its batch slot is freed
        before the next token); the answer so far is kept.  False when nothing runs."""
        if sess is None:
            return False
        with self._lock:
            request = self._active.get(sess.session_id)
        if request is None:
            return False
        request.cancel()
        return True

    def generating(self, sess: ChatSession) -> bool:
        with self._lock:
            return sess.session_id in self._active

    def _refuse_while_generating(self, sess: ChatSession) -> None:
        if self.generating(sess):
            raise ChatError("an answer is still being written: wait for it or press Stop")

    def _refuse_past_chat_cap(self, sess: ChatSession) -> None:
        """A new chat (or branch) past ``--max-chats-per-browser`` is refused before any work
        (the store checks again when it starts one)."""
        try:
            self.store.check_room_for_chat(sess.owner)
        except StoreError as exc:
            raise ChatError(str(exc)) from None

    def _refuse_if_changed_elsewhere(self, sess: ChatSession) -> None:
        """A chat reopened in two windows, or deleted in another one, must not be continued
        from a stale copy (it would overwrite turns the other window stored)."""
        if sess.conversation_id is not None and self.store.conversation_length(sess.conversation_id) != len(sess.messages):
            raise ChatError("this chat was changed or deleted in another window: reopen it from your chats "
                            "or start a new chat")

    def _start(self, sess: ChatSession, context: list[dict], params: SamplingParams, canary: bool = False,
               style_hint: str | None = None) -> Running:
        """Hands the context to an engine and marks the session as generating (called under
        the session's lock).  ``canary``: the candidate on trial writes it; ``style_hint``:
        recorded with the answer."""
        _, engine = self.holder.current()
        prompt_ids = engine.encode_chat(context)
        try:
            engine.check_fits(prompt_ids, params)
            with self._lock:
                if sess.session_id in self._active:
                    raise ChatError("an answer is still being written: wait for it or press Stop")
                version, engine, request = self.holder.submit(prompt_ids, params, canary, client=sess.client_key)
                self._active[sess.session_id] = request
                sess.writing = "answer"
        except (ContextTooLong, Busy) as exc:
            raise ChatError(str(exc)) from None
        return Running(version=version, engine=engine, request=request, style_hint=style_hint)

    def _stream(self, sess: ChatSession, running: Running):
        """Yields growing text; returns an Answer (generator return value).  Runs outside the
        session's lock; the session stays marked as generating until the caller has stored
        the answer, and is released here if the answer fails or its consumer goes away."""
        request = running.request
        try:
            stream = TextStream(running.engine.tokenizer, request)
            try:
                yield from stream
            except RuntimeError as exc:
                raise ChatError(f"the model failed to answer ({exc}); please try again") from None
            if request.finish_reason == "cancelled" and not stream.text.strip():
                raise ChatError("stopped before the first word; nothing was stored")
        except BaseException:
            self._release(sess, request)
            raise
        # surrounding whitespace is dropped, as the chat display does, so what is shown,
        # stored and fed back as context are the same text
        return Answer(text=stream.text.strip(), version=running.version, request=request,
                      style_hint=running.style_hint)

    @contextmanager
    def _releasing(self, sess: ChatSession, running: Running) -> Iterator[None]:
        """Releases the session's generation when the block ends, stored or not."""
        try:
            yield
        finally:
            self._release(sess, running.request)

    def _release(self, sess: ChatSession, request: Request) -> None:
        with self._lock:
            if self._active.get(sess.session_id) is request:
                del self._active[sess.session_id]
                sess.writing = ""
        if request.finished_at is None:  # the consumer went away mid-stream: free the slot
            request.cancel()

    def _record(self, sess: ChatSession, conversation_id: str, turn: int, context: list[dict],
                params: SamplingParams, answer: Answer) -> str:
        request = answer.request
        return self.store.record_generation(
            session_id=sess.session_id, conversation_id=conversation_id, turn=turn, context=context,
            content=answer.text, model_version=answer.version,
            sampling={**params.as_dict(), **({"style_hint": answer.style_hint} if answer.style_hint else {})},
            prompt_tokens=len(request.prompt_ids), completion_tokens=len(request.tokens),
            ttft_ms=request.ttft_ms, latency_ms=request.latency_ms, finish_reason=answer.finish_reason)

    # -- judgements --------------------------------------------------------------------------
    def vote(self, sess: ChatSession, verdict: str) -> str:
        """Decides the open comparison (committed before this returns); the chosen answer
        continues the conversation (tie and both bad keep A)."""
        verdict = (verdict if isinstance(verdict, str) else "").strip().lower().replace(" ", "_")
        if verdict not in VERDICTS:
            raise ChatError(f"the verdict must be one of {', '.join(VERDICTS)}")
        with self._serialised(sess):
            comp = sess.comparison
            if comp is None:
                raise ChatError("there is no comparison to vote on: regenerate an answer first")
            if comp.extras and comp.verdict is None:
                raise ChatError("four answers are open: rank them (1 = best) instead of voting on A and B")
            # an answer being written was conditioned on the kept answer; B replacing it now
            # would leave that answer stored after a turn it never saw
            self._refuse_while_generating(sess)
            self.vote_limit.hit(sess.client_key, "votes")
            try:
                with self._storing():  # the verdict and the kept answer together
                    self.store.decide_comparison(comp.id, verdict, sess.session_id)
                    if verdict == "b":
                        self.store.set_message(sess.conversation_id, comp.turn, "assistant", comp.b_text,
                                               comp.b_generation_id)
            except StoreError as exc:
                raise ChatError(str(exc)) from None
            comp.verdict, comp.winner = verdict, "B" if verdict == "b" else "A"
            if verdict == "b":
                sess.messages[comp.turn].update(content=comp.b_text, generation_id=comp.b_generation_id,
                                                edited=False)
        return f"Recorded: {VERDICT_TEXT[verdict]}."

    def rate(self, sess: ChatSession, answer: int, thumb: str, reasons: list[str] | None = None,
             comment: str = "") -> str:
        """Thumbs up/down on answer number ``answer`` (1-based; 0 = the latest); this session's
        identical rating of that answer (thumb, reasons and comment) is refused as a duplicate."""
        thumb = (thumb if isinstance(thumb, str) else "").strip().lower()
        if thumb not in THUMBS:
            raise ChatError("choose thumbs up or down")
        try:
            answer = int(answer or 0)
        except (TypeError, ValueError, OverflowError):
            raise ChatError("the answer number must be a whole number (0 = the latest)") from None
        reasons = reason_tags(reasons)
        comment = check_text(comment or "", "comment")
        if len(comment) > self.settings.max_message_chars:
            raise ChatError(f"the comment is too long (at most {self.settings.max_message_chars} characters)")
        with self._serialised(sess):  # rates a stored answer, so allowed while the next is written
            turn = sess.answer_turn(answer)
            kept = sess.messages[turn]
            if kept["edited"]:
                raise ChatError("that answer is your own rewrite; rate the model's answers")
            if self.store.has_rating(session_id=sess.session_id, generation_id=kept["generation_id"], thumb=thumb,
                                     reasons=reasons, comment=comment):
                raise ChatError("this rating was already saved (a duplicate is not stored twice)")
            self.vote_limit.hit(sess.client_key, "ratings")
            try:
                with self._storing():
                    self.store.record_rating(session_id=sess.session_id, generation_id=kept["generation_id"],
                                             thumb=thumb, reasons=reasons, comment=comment)
            except StoreError as exc:
                raise ChatError(str(exc)) from None
            number = sess.answer_turns().index(turn) + 1
        icon = "👍" if thumb == "up" else "👎"
        return f"Recorded: {icon} for answer {number}" + (f" ({', '.join(reasons)})" if reasons else "") + "."

    def edit(self, sess: ChatSession, rewrite: str) -> str:
        """The user's rewrite of the latest answer: stored as preferred over the model's
        answer, and it continues the conversation."""
        rewrite = self._checked_rewrite(rewrite)
        with self._serialised(sess):
            return self._edit_latest(sess, rewrite)

    def _checked_rewrite(self, rewrite: object) -> str:
        rewrite = rewrite if isinstance(rewrite, str) else ""
        if not rewrite.strip():
            raise ChatError("the rewrite is empty")
        if len(rewrite) > self.settings.max_message_chars:
            raise ChatError(f"the rewrite is too long: at most {self.settings.max_message_chars} characters")
        return check_text(rewrite, "rewrite")

    def _edit_latest(self, sess: ChatSession, rewrite: str) -> str:
        """``edit`` under the session's lock.  A latest answer that is already the user's own
        rewrite of a reopened chat (no model answer kept with it) is replaced without a vote."""
        if not sess.messages or sess.messages[-1]["role"] != "assistant":
            raise ChatError("there is no answer to rewrite yet")
        self._refuse_while_generating(sess)
        turn = len(sess.messages) - 1
        kept = sess.messages[turn]
        if rewrite == kept["content"]:
            raise ChatError("the rewrite is the same as the answer")
        self.vote_limit.hit(sess.client_key, "edits")
        try:
            with self._storing():  # the preference and the kept answer together
                if kept.get("generation_id"):
                    self.store.record_edit(session_id=sess.session_id,
                                           conversation_id=self._written_in(kept["generation_id"]),
                                           turn=turn, generation_id=kept["generation_id"], rewrite=rewrite)
                self.store.set_message(sess.conversation_id, turn, "assistant", rewrite, None)
        except StoreError as exc:
            raise ChatError(str(exc)) from None
        kept.update(content=rewrite, edited=True)
        if sess.comparison is not None and sess.comparison.turn == turn:
            sess.comparison = None
        if not kept.get("generation_id"):
            return "Recorded: your new rewrite replaces your earlier one and continues the chat."
        return "Recorded: your rewrite is stored as better than the model's answer and continues the chat."

    # -- "compare more": rank four answers ------------------------------------------------------
    def compare_more(self, sess: ChatSession, params: SamplingParams) -> Iterator[tuple[str, str]]:
        """Streams answers C and D to the open comparison's context, as (C so far, D so far).
        They are written one after the other, so a ranking holds one of the client's decoding
        slots, like a regenerate, and counts as one message against the rate limit; with a
        fixed seed, D is sampled with the next seed, so C and D differ (as recorded).  Once
        both are complete they are stored (generations like B's, and on the comparison row),
        and the user ranks all four (``rank``).  Stop, an error or a refusal stores neither
        answer and leaves the comparison of A and B open."""
        with self._serialised(sess):
            comp = sess.comparison
            if comp is None or comp.verdict is not None:
                raise ChatError("there is no open comparison to add answers to: regenerate an answer first")
            if comp.extras:
                raise ChatError("this comparison has four answers already: rank them")
            self._refuse_while_generating(sess)
            self.message_limit.hit(sess.client_key, "messages")
            context = sess.messages[comp.turn]["context"]
            running = self._start(sess, context, params)
            sess.writing = "C"
        texts = ["", ""]
        answers: list[Answer] = []
        d_params = params if params.seed is None else dataclasses.replace(params, seed=(params.seed + 1) % (MAX_SEED + 1))
        each = [params, d_params]
        for k in range(2):
            if k:  # C is complete: D takes over the session's claim at once, so no other call slips in
                with self._serialised(sess):
                    self._release(sess, running.request)
                    running = self._start(sess, context, each[k])
                    sess.writing = "D"
            answer = yield from _relayed(self._stream(sess, running), texts, k)
            if answer.finish_reason == "cancelled":
                self._release(sess, running.request)
                raise ChatError("stopped: the extra answers were not kept; vote on A and B, or press "
                                "Compare more again")
            answers.append(answer)
        with self._serialised(sess), self._releasing(sess, running):
            try:
                with self._storing():  # both answers and the comparison's extension, or nothing
                    ids = [self._record(sess, sess.conversation_id, comp.turn, context, p, a)
                           for p, a in zip(each, answers)]
                    stored = self.store.add_extra_answers(comp.id, sess.session_id, ids)
            except StoreError as exc:
                raise ChatError(str(exc)) from None
            comp.extras = [{**e, "text": a.text} for e, a in zip(stored, answers)]
            sess.model_version = answers[-1].version
            sess.finish_reason = next((a.finish_reason for a in answers if a.finish_reason == "length"),
                                      answers[-1].finish_reason)

    def rank(self, sess: ChatSession, order: object) -> str:
        """Decides the open comparison of four answers by the user's order of all of them,
        best first: "C>A=D>B" or a list of labels (``feedback.ranking.parse_order``; "=" for
        answers the user finds equally good).  One judgement, committed before this returns;
        the best answer continues the chat (A when A shares the first place, as a tie keeps A)."""
        with self._serialised(sess):
            comp = sess.comparison
            if comp is None:
                raise ChatError("there is no comparison to rank: regenerate an answer, then press Compare more")
            if comp.verdict is not None:
                raise ChatError(f"this comparison was already decided ({comp.verdict.replace('_', ' ')})")
            self._refuse_while_generating(sess)
            if not comp.extras:
                raise ChatError("there are only two answers: press Compare more to rank four, or vote on A and B")
            try:
                tiers = ranking.parse_order(order, ranking.labels_for(2 + len(comp.extras)))
            except ranking.InvalidOrder as exc:
                raise ChatError(str(exc)) from None
            self.vote_limit.hit(sess.client_key, "votes")
            winner = ranking.best(tiers)
            texts, generations = comp.texts(), comp.generation_ids()
            try:
                with self._storing():  # the ranking and the kept answer together
                    self.store.rank_comparison(comp.id, sess.session_id, tiers)
                    if winner != "A":
                        self.store.set_message(sess.conversation_id, comp.turn, "assistant", texts[winner],
                                               generations[winner])
            except StoreError as exc:
                raise ChatError(str(exc)) from None
            comp.verdict, comp.winner = ranking.RANK, winner
            if winner != "A":
                sess.messages[comp.turn].update(content=texts[winner], generation_id=generations[winner],
                                                edited=False)
        shown = ranking.format_order(tiers).replace(">", " > ").replace("=", " = ")
        return f"Recorded: your ranking {shown}; answer {winner} continues the chat."

    # -- edit in place -----------------------------------------------------------------------------
    def edit_message(self, sess: ChatSession, index: object, text: object,
                     params: SamplingParams) -> Iterator[str]:
        """The Chatbot's edit of message ``index`` (its position in the chat history, 0 = the
        first user message) to ``text``.  A generator: it yields the growing new answer when
        there is one, and returns the status note.

        - the latest answer: a rewrite (``edit``), preferred over the model's answer, which
          continues the chat;
        - an earlier answer: the chat branches at that answer, with the rewrite in its place
          (stored as preferred over the model's answer); continue it with a new message;
        - a user message: the chat branches there, and a new answer to the edited message is
          streamed and stored with the context the model saw.
        A branch is a new conversation of the same session, listed among the browser's chats
        and made the current one: the messages before ``index`` copied, then the edited one.
        The original chat and its judgements stay as they were.  Refusals (no such message,
        an unchanged, empty or too long text, an answer being written) store nothing and
        change nothing."""
        try:
            whole = not isinstance(index, bool) and isinstance(index, (int, float)) and index == int(index)
        except (OverflowError, ValueError):  # inf, nan
            whole = False
        if not whole:
            raise ChatError("the message index must be a whole number (0 = the first message)")
        index = int(index)
        text = self._checked_text(text, "edited message", "the edited message is empty")
        with self._serialised(sess):
            if not 0 <= index < len(sess.messages):
                raise ChatError(f"there is no message {index} in this chat"
                                + (f" (it has {len(sess.messages)}, numbered from 0)" if sess.messages else ""))
            self._refuse_while_generating(sess)
            edited = sess.messages[index]
            if edited["role"] == "assistant" and index == len(sess.messages) - 1:
                return self._edit_latest(sess, text)
            self._refuse_if_changed_elsewhere(sess)
            if text == edited["content"]:
                raise ChatError("the edited message is the same as before; nothing was changed")
            if edited["role"] == "assistant":
                return self._branch_at_answer(sess, index, text)
            self._refuse_past_chat_cap(sess)  # a branch is a new chat: refused before its answer is written
            self.message_limit.hit(sess.client_key, "messages")
            system = self._system_at(sess, index + 1)
            prefix = [dict(m) for m in sess.messages[:index]]
            context = ([{"role": "system", "content": system}] if system.strip() else []) + [
                {"role": m["role"], "content": m["content"]} for m in prefix] + [{"role": "user", "content": text}]
            source = sess.conversation_id
            running = self._start(sess, context, params)
        answer = yield from self._stream(sess, running)
        with self._serialised(sess), self._releasing(sess, running):
            try:
                with self._storing():  # the whole branch or nothing
                    conv = self._write_branch(sess, source, index, prefix)
                    self.store.set_message(conv, index, "user", text)
                    gen_id = self._record(sess, conv, index + 1, context, params, answer)
                    self.store.set_message(conv, index + 1, "assistant", answer.text, gen_id)
            except StoreError as exc:
                raise ChatError(str(exc)) from None
            sess.conversation_id, sess.comparison = conv, None
            sess.messages = prefix + [{"role": "user", "content": text, "generation_id": None, "edited": False},
                                      {"role": "assistant", "content": answer.text, "generation_id": gen_id,
                                       "edited": False, "context": context}]
            sess.model_version, sess.finish_reason = answer.version, answer.finish_reason
            self._note_version(sess, answer.version)
        return "Your edit starts a new chat from that message; the original chat is kept in your chats."

    def _branch_at_answer(self, sess: ChatSession, index: int, rewrite: str) -> str:
        """An earlier answer edited (under the session's lock): a branch ending with the
        rewrite, stored as preferred over the model's answer at that turn."""
        kept = sess.messages[index]
        self.vote_limit.hit(sess.client_key, "edits")
        prefix = [dict(m) for m in sess.messages[:index]]
        try:
            with self._storing():  # the branch and the preference together
                conv = self._write_branch(sess, sess.conversation_id, index, prefix)
                self.store.set_message(conv, index, "assistant", rewrite, None)
                if kept.get("generation_id"):
                    self.store.record_edit(session_id=sess.session_id,
                                           conversation_id=self._written_in(kept["generation_id"]), turn=index,
                                           generation_id=kept["generation_id"], rewrite=rewrite)
        except StoreError as exc:
            raise ChatError(str(exc)) from None
        sess.conversation_id, sess.comparison = conv, None
        sess.messages = prefix + [{**kept, "content": rewrite, "edited": True}]
        return ("Recorded: your rewrite is stored as better than the model's answer; it continues a new chat "
                "branched at that answer (the original chat is kept in your chats).")

    def _written_in(self, generation_id: str) -> str:
        """The conversation a generation was written in, which a rewrite of it names: in a
        branch, a copied answer is still the original chat's generation, and a maintainer's
        exclusion of the rewrite must reach that generation's prompt (``user_prompts``)."""
        return self.store.generation(generation_id)["conversation_id"]

    def _write_branch(self, sess: ChatSession, source: str, index: int, prefix: list[dict]) -> str:
        """The branch's conversation with the messages before ``index`` (inside the caller's
        transaction).  Copied answers keep their generation (an answer is one generation row,
        wherever it is kept, so nothing is counted twice); a rewrite is copied as a rewrite."""
        self._refuse_if_changed_elsewhere(sess)  # deleted meanwhile: its words must not come back
        conv = self.store.start_branch(sess.session_id, source, index)
        for turn, m in enumerate(prefix):
            self.store.set_message(conv, turn, m["role"], m["content"],
                                   None if m.get("edited") else m.get("generation_id"))
        return conv

    def _system_at(self, sess: ChatSession, answer_turn: int) -> str:
        """The system prompt the model saw for the answer at ``answer_turn`` (the
        conversation's when that answer is a rewrite of a reopened chat)."""
        context = sess.messages[answer_turn].get("context") if answer_turn < len(sess.messages) else None
        if context:
            return context[0]["content"] if context[0]["role"] == "system" else ""
        return self.settings.system_prompt if sess.system_prompt is None else sess.system_prompt


def _relayed(stream: Iterator[str], texts: list[str], k: int):
    """Relays a growing answer as text ``k`` of ``texts`` (yielding all of them each time);
    returns the stream's return value (an ``Answer``).  Closing this closes the stream."""
    try:
        while True:
            try:
                texts[k] = next(stream)
            except StopIteration as done:
                return done.value
            yield tuple(texts)
    finally:
        stream.close()
