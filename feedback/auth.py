"""Maintainer authentication for the console: password hashes, logins, session tokens.

- Credentials come from two places: the ``admin_user``/``admin_password`` settings (an empty
  password disables that login) and the ``users`` table, whose passwords are stored as
  salted scrypt hashes (``python -m feedback add-user``).  Only the roles in
  ``MAINTAINER_ROLES`` may log in to the console.
- Every comparison of a secret is constant time (``hmac.compare_digest``), and an unknown
  user costs the same scrypt work as a known one, so timing says nothing about who exists.
- A successful login yields a random token (256 bits) held server-side with an expiry; each
  console handler asks ``check(token)`` before doing anything.  Tokens live in memory, so a
  restart logs everyone out (deliberately: nothing secret is written to disk).  ``check``
  also re-reads the user's row, so removing a user, taking away the maintainer role or
  changing the password (``remove-user``/``add-user``, even from another process) revokes
  that user's tokens at their next request; ``logout`` revokes one token.
- Repeated failures lock out one (client address, user name) pair for a while, so a
  guesser cannot lock the real ``admin`` out from elsewhere.  The attempt is reserved
  *before* scrypt runs, so parallel guesses cannot all pass the check while the first ones
  are still hashing; at most ``MAX_CONCURRENT_CHECKS`` scrypt checks run at once (a flood
  of logins queues instead of eating every core), and that also bounds how fast new
  failure records can appear; expired ones are pruned every ``PRUNE_EVERY_S``.  User names
  have at most ``MAX_USERNAME`` characters.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from dataclasses import dataclass

from feedback.store import FeedbackStore, StoreError, now

MAINTAINER_ROLES = ("maintainer", "admin")
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2 ** 14, 8, 1
DEFAULT_TTL_S = 8 * 3600
MAX_FAILURES = 5
LOCKOUT_S = 300.0
PRUNE_EVERY_S = 60.0
MAX_USERNAME = 64
MAX_CONCURRENT_CHECKS = 2   # scrypt checks at once; each takes ~0.1 s of one core and 16 MiB
CHECK_WAIT_S = 10.0         # how long a login waits for a free check before "busy"
SETTINGS_CREDENTIAL = "settings"  # a session opened with the admin_user/admin_password settings


class AuthError(PermissionError):
    """Refused: not logged in, expired, or not a maintainer.  The message is shown as is."""


def hash_password(password: str, salt: bytes | None = None) -> str:
    salt = salt if salt is not None else secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P,
                            dklen=32)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${salt.hex()}${digest.hex()}"


def verify_password(password: str, stored: str | None) -> bool:
    """True when ``password`` matches ``stored``; a missing or malformed hash still costs one
    scrypt so the caller's timing does not depend on it."""
    try:
        scheme, n, r, p, salt_hex, digest_hex = (stored or "").split("$")
        if scheme != "scrypt":
            raise ValueError(scheme)
        n_, r_, p_, salt, expected = int(n), int(r), int(p), bytes.fromhex(salt_hex), bytes.fromhex(digest_hex)
    except ValueError:
        n_, r_, p_, salt, expected = SCRYPT_N, SCRYPT_R, SCRYPT_P, b"\0" * 16, b""
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n_, r=r_, p=p_, dklen=32,
                            maxmem=128 * n_ * r_ * (p_ + 2))
    return bool(expected) and hmac.compare_digest(digest, expected)


def add_user(store: FeedbackStore, username: str, password: str, role: str = "maintainer") -> None:
    """Creates or replaces a user; the password is stored only as a salted scrypt hash."""
    username = username.strip()
    if not username:
        raise StoreError("a user name is needed")
    if len(username) > MAX_USERNAME:
        raise StoreError(f"user names have at most {MAX_USERNAME} characters")
    if len(password) < 8:
        raise StoreError("use a password of at least 8 characters")
    with store.transaction() as db:
        db["users"].upsert({"username": username, "password_hash": hash_password(password), "role": role,
                            "created_at": now()}, pk="username")


def remove_user(store: FeedbackStore, username: str) -> bool:
    """Deletes a user; a running console refuses their tokens at the next request, because
    ``ConsoleAuth.check`` re-reads the row (this may run in another process, the CLI)."""
    with store.transaction() as db:
        return db.execute("DELETE FROM users WHERE username = ?", [username]).rowcount > 0


def list_users(store: FeedbackStore) -> list[dict]:
    return store.query("SELECT username, role, created_at FROM users ORDER BY username")


def has_users(store: FeedbackStore) -> bool:
    """Whether any console user exists (the console explains how to create one otherwise)."""
    return bool(store.query("SELECT 1 FROM users LIMIT 1"))


def user_row(store: FeedbackStore, username: str) -> dict | None:
    """The stored ``password_hash`` and ``role`` of one user, or None."""
    rows = store.query("SELECT password_hash, role FROM users WHERE username = ?", (username,))
    return rows[0] if rows else None


@dataclass
class Session:
    username: str
    expires_at: float
    credential: str  # SETTINGS_CREDENTIAL, or the password hash the login matched


class ConsoleAuth:
    """Logins and server-side session tokens for one running app."""

    def __init__(self, store: FeedbackStore, admin_user: str = "", admin_password: str = "",
                 ttl_s: float = DEFAULT_TTL_S, clock=time.monotonic):
        self.store = store
        self.admin_user = admin_user
        self.admin_password = admin_password
        self.ttl_s = ttl_s
        self.clock = clock
        self._sessions: dict[str, Session] = {}
        self._failures: dict[tuple[str, str], list[float]] = {}  # (client, user name) -> failure times
        self._lock = threading.Lock()
        self._checks = threading.BoundedSemaphore(MAX_CONCURRENT_CHECKS)
        self._last_prune = clock()

    def _credentials_ok(self, username: str, password: str) -> str | None:
        """The credential the password matches (``SETTINGS_CREDENTIAL`` or the stored hash),
        or None.  Always runs one scrypt, whichever way it ends."""
        settings_ok = False
        if self.admin_user and self.admin_password:
            user_ok = hmac.compare_digest(username.encode("utf-8"), self.admin_user.encode("utf-8"))
            pw_ok = hmac.compare_digest(password.encode("utf-8"), self.admin_password.encode("utf-8"))
            settings_ok = user_ok and pw_ok
        row = user_row(self.store, username) or {"password_hash": None, "role": None}
        db_ok = verify_password(password, row["password_hash"]) and row["role"] in MAINTAINER_ROLES
        if settings_ok:
            return SETTINGS_CREDENTIAL
        return row["password_hash"] if db_ok else None

    def login(self, username: str, password: str, client: str = "") -> str:
        """Returns a new session token, or raises ``AuthError``.  ``client`` is the caller's
        address: failures lock out that (client, name) pair, not the name everywhere."""
        username = (username or "").strip()
        password = password or ""
        if len(username) > MAX_USERNAME:
            raise AuthError(f"user names have at most {MAX_USERNAME} characters")
        if not username or not password:  # no guess made: nothing to hash or count
            raise AuthError("wrong user name or password")
        key = (client or "", username)
        t = self.clock()
        self._reserve(key, t)
        credential = self._verify(key, t, username, password)
        if credential is None:
            raise AuthError("wrong user name or password")  # the reservation stays as the failure
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._failures.pop(key, None)
            self._sessions = {k: s for k, s in self._sessions.items() if s.expires_at > t}
            self._sessions[token] = Session(username, t + self.ttl_s, credential)
        return token

    def _reserve(self, key: tuple[str, str], t: float) -> None:
        """Counts this attempt as a failure *before* the password is checked (a success
        clears it), so N parallel guesses see each other and at most ``MAX_FAILURES`` of
        them ever reach scrypt."""
        with self._lock:
            self._prune(t)
            recent = [f for f in self._failures.get(key, ()) if t - f < LOCKOUT_S]
            if len(recent) >= MAX_FAILURES:
                self._failures[key] = recent
                raise AuthError("too many failed logins for this user; try again in a few minutes")
            self._failures[key] = [*recent, t]

    def _release(self, key: tuple[str, str], t: float) -> None:
        """Gives back a reservation whose password was never checked."""
        with self._lock:
            times = self._failures.get(key, [])
            if t in times:
                times.remove(t)
            if not times:
                self._failures.pop(key, None)

    def _verify(self, key: tuple[str, str], t: float, username: str, password: str) -> str | None:
        """Runs the scrypt check in one of ``MAX_CONCURRENT_CHECKS`` slots."""
        if not self._checks.acquire(timeout=CHECK_WAIT_S):
            self._release(key, t)
            raise AuthError("the console is busy checking other logins; try again in a moment")
        try:
            return self._credentials_ok(username, password)
        except BaseException:
            self._release(key, t)
            raise
        finally:
            self._checks.release()

    def _prune(self, t: float) -> None:
        """Forgets failure records older than the lockout window (called under the lock)."""
        if t - self._last_prune < PRUNE_EVERY_S:
            return
        self._last_prune = t
        self._failures = {k: v for k, v in self._failures.items() if v and t - max(v) < LOCKOUT_S}

    def tracked_failure_keys(self) -> int:
        """How many (client, name) pairs hold failure records (for monitoring and tests)."""
        with self._lock:
            return len(self._failures)

    def _still_valid(self, session: Session) -> bool:
        """Whether the credential a session was opened with still stands: the user exists,
        is a maintainer and has the same password hash (settings logins: unchanged)."""
        if session.credential == SETTINGS_CREDENTIAL:
            return bool(self.admin_user and self.admin_password)
        row = user_row(self.store, session.username)
        return (row is not None and row["role"] in MAINTAINER_ROLES
                and hmac.compare_digest((row["password_hash"] or "").encode(), session.credential.encode()))

    def check(self, token: str | None) -> str:
        """The maintainer behind ``token``; raises ``AuthError`` when there is none."""
        if not token or not isinstance(token, str):
            raise AuthError("log in as a maintainer first")
        with self._lock:
            session = self._sessions.get(token)
            if session is None:
                raise AuthError("log in as a maintainer first")
            if session.expires_at <= self.clock():
                del self._sessions[token]
                raise AuthError("your console session expired; log in again")
        if not self._still_valid(session):
            self.logout(token)
            raise AuthError("your console account was removed or changed; log in again")
        return session.username

    def user(self, token: str | None) -> str | None:
        try:
            return self.check(token)
        except AuthError:
            return None

    def logout(self, token: str | None) -> None:
        """Revokes one token (the console's Log out button calls this)."""
        with self._lock:
            self._sessions.pop(token or "", None)
