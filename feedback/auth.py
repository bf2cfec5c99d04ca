"""Maintainer authentication for the console: password hashes, logins, session tokens.

- Credentials come from two places: the ``admin_user``/``admin_password`` settings (an empty
  password disables that login) and the ``users`` table, whose passwords are stored as
  salted scrypt hashes (``python -m feedback add-user``).  Only the roles in
  ``MAINTAINER_ROLES`` may log in to the console.
- Every comparison of a secret is constant time (``hmac.compare_digest``), and an unknown
  user costs the same scrypt work as a known one, so timing says nothing about who exists.
- A successful login yields a random token (256 bits) held server-side with an expiry; each
  console handler asks ``check(token)`` before doing anything.  Tokens live in memory, so a
  restart logs everyone out (deliberately: nothing secret is written to disk).
- Repeated failures for one user name lock that name out for a while.
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
    if len(password) < 8:
        raise StoreError("use a password of at least 8 characters")
    with store.transaction() as db:
        db["users"].upsert({"username": username, "password_hash": hash_password(password), "role": role,
                            "created_at": now()}, pk="username")


def remove_user(store: FeedbackStore, username: str) -> bool:
    with store.transaction() as db:
        return db.execute("DELETE FROM users WHERE username = ?", [username]).rowcount > 0


def list_users(store: FeedbackStore) -> list[dict]:
    return store.query("SELECT username, role, created_at FROM users ORDER BY username")


@dataclass
class Session:
    username: str
    expires_at: float


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
        self._failures: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    def _credentials_ok(self, username: str, password: str) -> bool:
        ok = False
        if self.admin_user and self.admin_password:
            user_ok = hmac.compare_digest(username.encode("utf-8"), self.admin_user.encode("utf-8"))
            pw_ok = hmac.compare_digest(password.encode("utf-8"), self.admin_password.encode("utf-8"))
            ok = user_ok and pw_ok
        rows = self.store.query("SELECT password_hash, role FROM users WHERE username = ?", (username,))
        row = rows[0] if rows else {"password_hash": None, "role": None}
        db_ok = verify_password(password, row["password_hash"]) and row["role"] in MAINTAINER_ROLES
        return ok or db_ok

    def login(self, username: str, password: str) -> str:
        """Returns a new session token, or raises ``AuthError``."""
        username = (username or "").strip()
        password = password or ""
        t = self.clock()
        with self._lock:
            recent = [f for f in self._failures.get(username, []) if t - f < LOCKOUT_S]
            self._failures[username] = recent
            if len(recent) >= MAX_FAILURES:
                raise AuthError("too many failed logins for this user; try again in a few minutes")
        if not username or not password or not self._credentials_ok(username, password):
            with self._lock:
                self._failures.setdefault(username, []).append(t)
            raise AuthError("wrong user name or password")
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._failures.pop(username, None)
            self._sessions[token] = Session(username, t + self.ttl_s)
        return token

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
            return session.username

    def user(self, token: str | None) -> str | None:
        try:
            return self.check(token)
        except AuthError:
            return None

    def logout(self, token: str | None) -> None:
        with self._lock:
            self._sessions.pop(token or "", None)
