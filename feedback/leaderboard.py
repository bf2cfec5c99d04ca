"""A leaderboard of model versions from the users' own side-by-side comparisons.

Bradley-Terry strengths fitted by the minorization-maximization iteration (Hunter 2004),
shown on the Elo scale (400 points = 10:1 odds, mean 1000), with percentile bootstrap
confidence intervals from resampling the comparisons.

Which comparisons count:
- a comparison's answers A and B come from generations (``a_generation_id`` and
  ``b_generation_id``) whose ``model_version`` names the players;
- verdict ``a`` or ``b``: one win; ``tie``: half a win to each side;
- ``both_bad``: skipped (it says both lost to something better, not which is better);
- ``edit``: skipped (B is the user's rewrite, not a model version);
- ``rank`` (a ranking of four answers, "compare more"): one game, A against B, scored by
  their places in the order (equal places: a tie).  Its other pairs are left out: answers C
  and D come from the served version, usually A's, and counting all C(4, 2) pairs would make
  one judgement several games, which the bootstrap over comparisons assumes it is not;
- two answers from the same version: skipped (no information between versions);
- excluded records and opted-out sessions: skipped, as everywhere else.
A small prior (one virtual tie of every version against the mean) keeps versions that
never lost (or never won) finite.
"""

from __future__ import annotations

import math

import numpy as np

from feedback import ranking
from feedback.store import FeedbackStore


def games(store: FeedbackStore) -> list[tuple[str, str, float]]:
    """``(version_a, version_b, score_a)`` of each usable comparison between two versions."""
    rows = store.query(
        "SELECT ga.model_version AS va, gb.model_version AS vb, c.verdict AS verdict, c.ranking AS ranking "
        "FROM comparisons c "
        "JOIN sessions s ON s.id = c.session_id "
        "JOIN generations ga ON ga.id = c.a_generation_id JOIN generations gb ON gb.id = c.b_generation_id "
        "WHERE c.verdict IN ('a', 'b', 'tie', 'rank') AND c.excluded = 0 AND s.opt_out = 0 "
        "AND ga.model_version IS NOT NULL AND gb.model_version IS NOT NULL AND ga.model_version != gb.model_version")
    score = {"a": 1.0, "b": 0.0, "tie": 0.5}
    out = []
    for r in rows:
        if r["verdict"] == ranking.RANK:
            tiers = ranking.loads(r["ranking"])
            if not tiers or not {"A", "B"} <= {label for tier in tiers for label in tier}:
                continue
            a, b = ranking.position(tiers, "A"), ranking.position(tiers, "B")
            out.append((r["va"], r["vb"], 1.0 if a < b else 0.0 if a > b else 0.5))
        else:
            out.append((r["va"], r["vb"], score[r["verdict"]]))
    return out


def fit(n: int, i: np.ndarray, j: np.ndarray, s: np.ndarray, prior: float = 1.0,
        iters: int = 200) -> np.ndarray:
    """Bradley-Terry log-strengths (mean 0) from games i vs j where i scored s."""
    wins = np.full(n, prior / 2)  # the prior: a virtual tie against a mean-strength player
    np.add.at(wins, i, s)
    np.add.at(wins, j, 1 - s)
    p = np.ones(n)
    for _ in range(iters):
        denom = np.full(n, prior / (p + 1.0) / 1.0)  # prior opponent has strength 1
        inv = 1.0 / (p[i] + p[j])
        np.add.at(denom, i, inv)
        np.add.at(denom, j, inv)
        new = wins / denom
        new /= math.exp(np.mean(np.log(new)))
        if np.max(np.abs(new - p)) < 1e-9:
            p = new
            break
        p = new
    return np.log(p)


def elo(log_strength: np.ndarray) -> np.ndarray:
    return 1000 + 400 / math.log(10) * (log_strength - log_strength.mean())


def leaderboard(store: FeedbackStore, n_boot: int = 200, seed: int = 0, confidence: float = 0.95) -> list[dict]:
    """Rows ``{version, rating, ci_low, ci_high, games, wins, ties, losses}``, best first."""
    played = games(store)
    if not played:
        return []
    names = sorted({v for g in played for v in g[:2]})
    index = {v: k for k, v in enumerate(names)}
    i = np.array([index[g[0]] for g in played])
    j = np.array([index[g[1]] for g in played])
    s = np.array([g[2] for g in played])
    rating = elo(fit(len(names), i, j, s))
    rng = np.random.default_rng(seed)
    boots = np.empty((n_boot, len(names)))
    for b in range(n_boot):
        pick = rng.integers(0, len(played), len(played))
        boots[b] = elo(fit(len(names), i[pick], j[pick], s[pick], iters=100))
    alpha = (1 - confidence) / 2
    low, high = np.quantile(boots, alpha, axis=0), np.quantile(boots, 1 - alpha, axis=0)
    rows = []
    for k, name in enumerate(names):
        mine_a, mine_b = i == k, j == k
        wins = float(np.sum(s[mine_a] == 1) + np.sum(s[mine_b] == 0))
        ties = float(np.sum(s[mine_a | mine_b] == 0.5))
        n_games = int(np.sum(mine_a | mine_b))
        rows.append({"version": name, "rating": round(float(rating[k]), 1), "ci_low": round(float(low[k]), 1),
                     "ci_high": round(float(high[k]), 1), "games": n_games, "wins": int(wins),
                     "ties": int(ties), "losses": int(n_games - wins - ties)})
    rows.sort(key=lambda r: -r["rating"])
    return rows
