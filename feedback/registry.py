"""Model versions, what is served, training runs and their metrics: the meeting point of
the retrain side (writes versions and runs) and the serving side (reads what to serve).

Lives in ``feedback/`` because the store is the only place that writes SQL; the retrain
process and the app each open their own ``FeedbackStore`` on the same file.
"""

from __future__ import annotations

import json
from typing import Any

from feedback.store import FeedbackStore, NotFound, StoreError, _json, new_id, now

RUN_STATES = ("queued", "running", "canary", "promoted", "rejected", "failed")
CANARY_KEY = "canary"


class Registry:
    def __init__(self, store: FeedbackStore):
        self.store = store

    # -- versions ------------------------------------------------------------------------
    def register_version(self, *, version_id: str | None = None, path: str, kind: str,
                         parent_id: str | None = None, base_model: str = "", run_id: str | None = None,
                         metrics: dict | None = None, config: dict | None = None,
                         feedback: dict | None = None, note: str = "") -> str:
        version_id = version_id or f"v-{new_id()[:12]}"
        with self.store.transaction() as db:
            db["model_versions"].insert({
                "id": version_id, "parent_id": parent_id, "kind": kind, "path": path,
                "base_model": base_model, "created_at": now(), "run_id": run_id,
                "metrics": _json(metrics or {}), "config": _json(config or {}),
                "feedback": _json(feedback or {}), "note": note}, ignore=True)
        return version_id

    def version(self, version_id: str) -> dict:
        rows = self.store.query("SELECT * FROM model_versions WHERE id = ?", (version_id,))
        if not rows:
            raise NotFound(f"no model version {version_id!r}")
        return rows[0]

    def versions(self) -> list[dict]:
        return self.store.query("SELECT * FROM model_versions ORDER BY created_at")

    def set_served(self, version_id: str, action: str, actor: str = "system", reason: str = "") -> None:
        """Records which version serves from now on (serve | promote | rollback); the app
        follows the last row of serving_log."""
        self.version(version_id)
        if action not in ("serve", "promote", "rollback"):
            raise StoreError(f"unknown serving action {action!r}")
        with self.store.transaction() as db:
            db["serving_log"].insert({"version_id": version_id, "action": action, "actor": actor,
                                      "reason": reason, "at": now()})

    def served(self) -> dict | None:
        rows = self.store.query("SELECT * FROM serving_log ORDER BY id DESC LIMIT 1")
        return rows[0] if rows else None

    def served_version(self) -> str | None:
        row = self.served()
        return row["version_id"] if row else None

    def serving_history(self) -> list[dict]:
        return self.store.query("SELECT * FROM serving_log ORDER BY id")

    # -- runs -------------------------------------------------------------------------------
    def create_run(self, trigger: str, config: dict | None = None) -> str:
        run_id = f"run-{now()[:19].replace(':', '').replace('-', '')}-{new_id()[:6]}"
        with self.store.transaction() as db:
            db["training_runs"].insert({"id": run_id, "status": "queued", "trigger": trigger,
                                        "created_at": now(), "config": _json(config or {})})
        return run_id

    def update_run(self, run_id: str, **fields: Any) -> None:
        if "status" in fields and fields["status"] not in RUN_STATES:
            raise StoreError(f"unknown run status {fields['status']!r}")
        for key in ("data", "config", "decision"):
            if key in fields and not isinstance(fields[key], str):
                fields[key] = _json(fields[key])
        with self.store.transaction() as db:
            db["training_runs"].update(run_id, fields)

    def run(self, run_id: str) -> dict:
        rows = self.store.query("SELECT * FROM training_runs WHERE id = ?", (run_id,))
        if not rows:
            raise NotFound(f"no training run {run_id!r}")
        return rows[0]

    def runs(self, limit: int = 100) -> list[dict]:
        return self.store.query("SELECT * FROM training_runs ORDER BY created_at DESC LIMIT ?", (limit,))

    def log_metrics(self, run_id: str, phase: str, step: int, metrics: dict[str, float]) -> None:
        at = now()
        rows = [{"run_id": run_id, "phase": phase, "step": step, "name": k, "value": float(v), "at": at}
                for k, v in metrics.items() if v is not None]
        with self.store.transaction() as db:
            db["run_metrics"].insert_all(rows)

    def metrics(self, run_id: str, phase: str | None = None) -> list[dict]:
        sql = "SELECT phase, step, name, value FROM run_metrics WHERE run_id = ?"
        params: tuple = (run_id,)
        if phase:
            sql += " AND phase = ?"
            params = (run_id, phase)
        return self.store.query(sql + " ORDER BY phase, step", params)

    def mark_used(self, run_id: str, comparison_ids: list[str]) -> None:
        with self.store.transaction() as db:
            for cid in comparison_ids:
                db.execute("UPDATE comparisons SET used_in_run = ? WHERE id = ?", [run_id, cid])

    # -- reward models ---------------------------------------------------------------------
    def register_reward_model(self, **fields: Any) -> str:
        rm_id = fields.pop("id", None) or f"rm-{new_id()[:12]}"
        with self.store.transaction() as db:
            db["reward_models"].insert({"id": rm_id, "created_at": now(), **fields})
        return rm_id

    def latest_reward_model(self, role: str = "policy") -> dict | None:
        """The newest reward model of a role ('policy': the one PPO optimises; 'judge')."""
        rows = self.store.query("SELECT * FROM reward_models WHERE coalesce(role, 'policy') = ? "
                                "ORDER BY created_at DESC, rowid DESC LIMIT 1", (role,))
        return rows[0] if rows else None


    # -- live canary ---------------------------------------------------------------------
    def start_canary(self, *, run_id: str, version_id: str, parent_id: str) -> dict:
        """Puts a published, gated version on trial: the app serves it as answer B in a share
        of regenerate-and-compare turns until users' votes decide (``retrain.canary``)."""
        self.version(version_id)
        state = {"run_id": run_id, "version_id": version_id, "parent_id": parent_id, "started_at": now()}
        with self.store.transaction() as db:
            db["app_state"].upsert({"key": CANARY_KEY, "value": _json(state), "updated_at": now()}, pk="key")
            db.execute("UPDATE training_runs SET status = 'canary' WHERE id = ?", [run_id])
        return state

    def canary(self) -> dict | None:
        """The version on trial, or None."""
        return self.store.get_state(CANARY_KEY) or None

    def end_canary(self, run_id: str, *, promote: bool, reason: str, decision: dict) -> None:
        """Ends the trial in one transaction: the run becomes promoted (and its version is
        served) or rejected; the canary state is cleared."""
        state = self.canary()
        if not state or state["run_id"] != run_id:
            raise StoreError(f"run {run_id} is not on trial")
        run = self.run(run_id)
        merged = {**(loads(run["decision"]) or {}), "canary": decision}
        with self.store.transaction() as db:
            db.execute("DELETE FROM app_state WHERE key = ?", [CANARY_KEY])
            db.execute("UPDATE training_runs SET status = ?, reason = ?, decision = ?, finished_at = ? WHERE id = ?",
                       ["promoted" if promote else "rejected", reason, _json(merged), now(), run_id])
            if promote:
                db["serving_log"].insert({"version_id": state["version_id"], "action": "promote",
                                          "actor": "canary", "reason": reason, "at": now()})

    def canary_votes(self, version_id: str, parent_id: str, since: str) -> list[dict]:
        """Users' decided A/B votes between the candidate and its parent since the trial
        began (not excluded, not from opted-out sessions), with each answer's version."""
        return self.store.query(
            "SELECT c.id, c.verdict, c.decided_at, ga.model_version AS a_version, gb.model_version AS b_version "
            "FROM comparisons c JOIN sessions s ON s.id = c.session_id "
            "JOIN generations ga ON ga.id = c.a_generation_id JOIN generations gb ON gb.id = c.b_generation_id "
            "WHERE c.verdict IN ('a', 'b', 'tie', 'both_bad') AND c.excluded = 0 AND s.opt_out = 0 "
            "AND c.decided_at >= ? AND ((ga.model_version = ? AND gb.model_version = ?) "
            "OR (ga.model_version = ? AND gb.model_version = ?)) ORDER BY c.decided_at, c.rowid",
            (since, version_id, parent_id, parent_id, version_id))


def canary_tally(votes: list[dict], version_id: str) -> tuple[int, int, int]:
    """(wins, losses, ties) of the candidate in ``canary_votes`` rows; a tie or "both bad"
    is a tie."""
    wins = losses = ties = 0
    for v in votes:
        if v["verdict"] not in ("a", "b"):
            ties += 1
        elif (v["a_version"] if v["verdict"] == "a" else v["b_version"]) == version_id:
            wins += 1
        else:
            losses += 1
    return wins, losses, ties


def loads(text: str | None) -> Any:
    return json.loads(text) if text else None
