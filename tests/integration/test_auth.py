"""Console logins under attack: parallel guessing, lockout keying, memory, revocation.

Everything runs the real ``ConsoleAuth`` against a real SQLite file with real scrypt; the
only instrument is ``CountingAuth``, a subclass that counts the password checks (and how
many run at once) around the real ones.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest

from feedback import auth
from feedback.store import StoreError

ROOT = Path(__file__).resolve().parents[2]
PW = "long enough pw"


class CountingAuth(auth.ConsoleAuth):
    """The real login path; counts the scrypt checks it runs and the most at once."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.checks = 0
        self.active = 0
        self.peak = 0
        self._count_lock = threading.Lock()

    def _credentials_ok(self, username, password):
        with self._count_lock:
            self.checks += 1
            self.active += 1
            self.peak = max(self.peak, self.active)
        try:
            return super()._credentials_ok(username, password)
        finally:
            with self._count_lock:
                self.active -= 1


def parallel(n: int, fn) -> list[str]:
    """Runs ``fn(i)`` in ``n`` threads released at once; returns each outcome's message."""
    barrier = threading.Barrier(n)
    outcomes: list[str] = [""] * n

    def run(i):
        barrier.wait()
        try:
            fn(i)
            outcomes[i] = "ok"
        except auth.AuthError as exc:
            outcomes[i] = str(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcomes


def test_parallel_guesses_cannot_pass_the_lockout(store):
    auth.add_user(store, "maria", PW)
    a = CountingAuth(store)
    outcomes = parallel(40, lambda i: a.login("maria", f"guess {i}", client="203.0.113.9"))
    evaluated = [o for o in outcomes if o == "wrong user name or password"]
    assert a.checks <= auth.MAX_FAILURES
    assert len(evaluated) <= auth.MAX_FAILURES
    assert all(o.startswith(("wrong user name", "too many failed logins")) for o in outcomes)
    with pytest.raises(auth.AuthError, match="too many"):
        a.login("maria", PW, client="203.0.113.9")


def test_failures_from_one_client_do_not_lock_out_another(store):
    auth.add_user(store, "admin", PW, role="admin")
    a = auth.ConsoleAuth(store)
    for i in range(auth.MAX_FAILURES + 2):
        with pytest.raises(auth.AuthError):
            a.login("admin", f"guess {i}", client="198.51.100.7")
    with pytest.raises(auth.AuthError, match="too many"):
        a.login("admin", PW, client="198.51.100.7")  # the guesser is locked out...
    assert a.check(a.login("admin", PW, client="192.0.2.1")) == "admin"  # ...the real admin is not


def test_failures_are_forgotten_after_the_lockout_window_and_names_are_capped(store):
    t = [1000.0]
    a = auth.ConsoleAuth(store, clock=lambda: t[0])
    for i in range(6):
        with pytest.raises(auth.AuthError):
            a.login(f"nobody{i}", "some guess", client="198.51.100.7")
    assert a.tracked_failure_keys() == 6
    t[0] += auth.LOCKOUT_S + auth.PRUNE_EVERY_S + 1
    with pytest.raises(auth.AuthError):
        a.login("nobody-else", "some guess", client="198.51.100.7")
    assert a.tracked_failure_keys() == 1  # the expired ones are gone

    long_name = "x" * (auth.MAX_USERNAME + 1)
    with pytest.raises(auth.AuthError, match="at most"):
        a.login(long_name * 1000, "some guess", client="198.51.100.7")
    assert a.tracked_failure_keys() == 1  # refused before it costs memory or scrypt
    with pytest.raises(StoreError, match="at most"):
        auth.add_user(store, long_name, PW)
    auth.add_user(store, "y" * auth.MAX_USERNAME, PW)


def test_concurrent_password_checks_are_bounded(store):
    a = CountingAuth(store)
    outcomes = parallel(8, lambda i: a.login(f"user{i}", "some guess", client=f"192.0.2.{i}"))
    assert a.checks == 8 and set(outcomes) == {"wrong user name or password"}
    assert a.peak <= auth.MAX_CONCURRENT_CHECKS


def test_removing_or_demoting_a_user_revokes_their_tokens(store):
    auth.add_user(store, "maria", PW)
    auth.add_user(store, "omar", PW)
    auth.add_user(store, "lena", PW)
    a = auth.ConsoleAuth(store, "admin", "settings-pw")
    maria, omar, lena = (a.login(u, PW) for u in ("maria", "omar", "lena"))
    admin = a.login("admin", "settings-pw")
    assert auth.remove_user(store, "maria")
    with pytest.raises(auth.AuthError):
        a.check(maria)
    auth.add_user(store, "omar", PW, role="viewer")  # no longer a maintainer
    with pytest.raises(auth.AuthError):
        a.check(omar)
    # removal from another process (the CLI) reaches the running app's tokens too
    r = subprocess.run([sys.executable, "-m", "feedback", "--db", str(store.path), "remove-user", "lena"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "removed" in r.stdout, r.stderr
    with pytest.raises(auth.AuthError):
        a.check(lena)
    assert a.check(admin) == "admin"


def test_has_users(store):
    assert not auth.has_users(store)
    auth.add_user(store, "maria", PW)
    assert auth.has_users(store)
