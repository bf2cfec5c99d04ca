"""The live canary: users' own votes decide whether a gated candidate is promoted.

A candidate that passed the offline gate (``retrain.gate``) is published and put on trial
(``Registry.start_canary``) instead of being served.  The app then writes answer B with the
candidate in ``--canary-share`` of regenerate-and-compare turns (``ModelHolder.submit``),
so users compare it blind against the served version, the candidate's parent.  This module
reads those votes and decides:

- each decisive vote is a win or a loss for the candidate; ties and "both bad" say nothing
  about which is better, so the decision is a sign test over the decisive votes (ties are
  counted and reported, and the ties-half win rate is reported beside it);
- no one user decides it: at most ``max_votes_per_client`` decisive votes count from one
  client (its address) and from one browser key, the earliest; the rest are counted as
  ``capped``, and no decision on the evidence is taken before ``min_clients`` distinct
  clients have voted (the page and the API do not say which answer the candidate wrote
  before the vote, ``assistant.chat``);
- **promote** when at least ``min_votes`` decisive votes are in and the Wilson lower bound
  (``z`` = 1.645, one-sided 95%) of the candidate's win rate is above 0.5;
- **reject** when the upper bound is below 0.5 (users prefer what is served), when
  ``max_votes`` votes or ``max_minutes`` pass without a decision (inconclusive), or when the
  served version changed under the trial (a maintainer rolled back or promoted another).

``CanaryWatcher`` runs ``check`` in the app every few seconds, whether or not the retrain
schedule is enabled; the decision is one transaction in the registry (run status, serving
log, canary state), and the app's ``VersionFollower`` serves what it says.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

from feedback.registry import Registry, canary_tally
from retrain.reward import wilson

log = logging.getLogger(__name__)


@dataclass
class CanaryConfig:
    share: float = 0.5
    """Share of regenerate-and-compare turns whose answer B comes from the candidate."""
    min_votes: int = 10
    """Decisive votes needed before any decision on the evidence."""
    max_votes: int = 300
    """Votes (decisive or not) after which an undecided trial is rejected as inconclusive."""
    max_minutes: float = 1440.0
    """Minutes after which an undecided trial is rejected as inconclusive."""
    z: float = 1.645
    """Wilson z of the decision bounds (1.645: one-sided 95%)."""
    max_votes_per_client: int = 5
    """Decisive votes counted from one client (address) and from one browser key, the earliest."""
    min_clients: int = 5
    """Distinct clients whose decisive votes count, before any decision on the evidence."""

    @classmethod
    def from_settings(cls, settings) -> CanaryConfig:
        return cls(share=settings.canary_share, min_votes=settings.canary_min_votes,
                   max_votes=settings.canary_max_votes, max_minutes=settings.canary_max_minutes,
                   max_votes_per_client=settings.canary_max_votes_per_client,
                   min_clients=settings.canary_min_clients)


@dataclass
class CanaryDecision:
    action: str  # 'continue' | 'promote' | 'reject'
    reason: str
    votes: int
    wins: int
    losses: int
    ties: int
    win_rate: float  # over decisive votes
    ci_low: float
    ci_high: float
    win_rate_ties_half: float
    minutes: float
    clients: int = 0
    """Distinct clients whose decisive votes were counted."""
    capped: int = 0
    """Decisive votes not counted (past ``max_votes_per_client`` from one client or browser)."""


def decide(wins: int, losses: int, ties: int, minutes: float, cfg: CanaryConfig, clients: int | None = None,
           capped: int = 0) -> CanaryDecision:
    """The trial's decision from the tallies so far (pure; tested by hand); ``clients``: the
    distinct clients behind the decisive votes (None: enough), ``capped``: votes not counted."""
    n = wins + losses
    total = n + ties + capped
    lo, hi = wilson(wins, n, cfg.z)
    rate = wins / n if n else float("nan")
    half = (wins + 0.5 * ties) / (n + ties) if n + ties else float("nan")
    who = "" if clients is None else f" from {clients} client{'s' * (clients != 1)}"
    what = f"users preferred the candidate in {wins} of {n} decisive votes{who} ({ties} ties" + \
           (f", {capped} more past {cfg.max_votes_per_client} per client not counted" if capped else "") + \
           f"), bounds {lo:.0%}-{hi:.0%}"
    enough = n >= cfg.min_votes and (clients is None or clients >= cfg.min_clients)
    if enough and lo > 0.5:
        action, reason = "promote", f"canary: {what}"
    elif enough and hi < 0.5:
        action, reason = "reject", f"canary: users prefer the served version; {what}"
    elif total >= cfg.max_votes or minutes >= cfg.max_minutes:
        action, reason = "reject", f"canary inconclusive after {total} votes and {minutes:.0f} min: {what}"
    else:
        action, reason = "continue", f"canary running: {what}" + (
            f"; waiting for votes from {cfg.min_clients - clients} more clients"
            if clients is not None and clients < cfg.min_clients and n >= cfg.min_votes else "")
    return CanaryDecision(action, reason, total, wins, losses, ties, rate, lo, hi, half, minutes,
                          clients or 0, capped)


def status(registry: Registry, cfg: CanaryConfig, now: datetime | None = None) -> CanaryDecision | None:
    """The current trial's standing (for the console and ``check``), or None."""
    state = registry.canary()
    if not state:
        return None
    votes = registry.canary_votes(state["version_id"], state["parent_id"], state["started_at"])
    now = now or datetime.now(timezone.utc)
    minutes = (now - datetime.fromisoformat(state["started_at"])).total_seconds() / 60
    t = canary_tally(votes, state["version_id"], cfg.max_votes_per_client)
    return decide(t.wins, t.losses, t.ties, minutes, cfg, t.clients, t.capped)


def check(registry: Registry, cfg: CanaryConfig, now: datetime | None = None) -> CanaryDecision | None:
    """Decides the trial if the votes allow; returns the decision (None without a trial)."""
    state = registry.canary()
    if not state:
        return None
    decision = status(registry, cfg, now)
    if registry.served_version() != state["parent_id"]:
        decision.action = "reject"
        decision.reason = (f"canary ended: the served version changed to {registry.served_version()} "
                           f"during the trial (it was {state['parent_id']})")
    if decision.action != "continue":
        registry.end_canary(state["run_id"], promote=decision.action == "promote", reason=decision.reason,
                            decision=asdict(decision))
        log.info("canary %s: %s", state["version_id"], decision.reason)
    return decision


class CanaryWatcher:
    """Runs ``check`` every ``interval_s`` in the app (a daemon thread)."""

    def __init__(self, registry: Registry, cfg: CanaryConfig, interval_s: float = 5.0):
        self.registry, self.cfg, self.interval_s = registry, cfg, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="canary-watcher", daemon=True)

    def start(self) -> CanaryWatcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                check(self.registry, self.cfg)
            except Exception:  # noqa: BLE001 - a database hiccup must not kill the watcher
                log.exception("canary check failed")
