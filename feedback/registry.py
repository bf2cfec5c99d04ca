"""Model versions, what is served, training runs and their metrics: the meeting point of
the retrain side (writes versions and runs) and the serving side (reads what to serve).

Lives in ``feedback/`` because SQL lives only there (see ``feedback.store``); the retrain
process and the app each open their own ``FeedbackStore`` on the same file.
"""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

from feedback.store import FeedbackStore, NotFound, StoreError, _json, new_id, now

RUN_STATES = ("queued", "running", "canary", "promoted", "passed", "rejected", "failed")
"""``passed``: the candidate passed (the gate, or its trial) but was not promoted because the
served version changed under the run (a maintainer rolled back or promoted another)."""
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

    def register_base(self, version_id: str, path: str, base_model: str, note: str = "") -> bool:
        """Registers the model the app was started with as ``version_id``, or points the
        existing row at it when ``--model`` changed since (the base must always be the model
        the app was given, not the first one it ever saw).  Returns True when it changed."""
        with self.store.transaction() as db:
            rows = list(db.query("SELECT path, base_model FROM model_versions WHERE id = ?", [version_id]))
            if not rows:
                db["model_versions"].insert({
                    "id": version_id, "parent_id": None, "kind": "sft", "path": path, "base_model": base_model,
                    "created_at": now(), "run_id": None, "metrics": "{}", "config": "{}", "feedback": "{}",
                    "note": note})
                return True
            if (rows[0]["path"], rows[0]["base_model"]) == (path, base_model):
                return False
            db["model_versions"].update(version_id, {"path": path, "base_model": base_model,
                                                     "note": f"{note} (was {rows[0]['path']})"})
            return True

    def version(self, version_id: str) -> dict:
        rows = self.store.query("SELECT * FROM model_versions WHERE id = ?", (version_id,))
        if not rows:
            raise NotFound(f"no model version {version_id!r}")
        return rows[0]

    def versions(self) -> list[dict]:
        return self.store.query("SELECT * FROM model_versions ORDER BY created_at")

    def set_served(self, version_id: str, action: str, actor: str = "system", reason: str = "", *,
                   only_if_served: str | None = None, only_if_row: int | None = None) -> bool:
        """Records which version serves from now on (serve | promote | rollback); the app
        follows the last row of serving_log.  The low-level write: people and runs go
        through ``retrain.versions.serve_version``, which checks the files first.

        ``only_if_served`` / ``only_if_row``: record it only if that version is still the
        one served / that row is still the last one, checked in the same transaction, so a
        decision made on what was served a moment ago cannot overwrite a newer one.
        Returns False (nothing written) when the condition no longer holds."""
        self.version(version_id)
        if action not in ("serve", "promote", "rollback"):
            raise StoreError(f"unknown serving action {action!r}")
        with self.store.transaction() as db:
            if not self._still_served(db, only_if_served, only_if_row):
                return False
            db["serving_log"].insert({"version_id": version_id, "action": action, "actor": actor,
                                      "reason": reason, "at": now()})
        return True

    @staticmethod
    def _still_served(db, version_id: str | None, row_id: int | None) -> bool:
        """Inside a transaction: is ``version_id`` still served and ``row_id`` still the last row?"""
        if version_id is None and row_id is None:
            return True
        last = db.execute("SELECT id, version_id FROM serving_log ORDER BY id DESC LIMIT 1").fetchone()
        if version_id is not None and (last[1] if last else None) != version_id:
            return False
        return row_id is None or (last[0] if last else None) == row_id

    def promote_run(self, run_id: str, version_id: str, parent_id: str, *, actor: str, reason: str,
                    **fields: Any) -> bool:
        """Ends a run whose candidate passed: in one transaction, serves ``version_id`` and
        marks the run promoted if ``parent_id`` (what the run trained from and was judged
        against) is still served; otherwise marks it passed, not promoted, and serves
        nothing, so a rollback made during the run is never undone.  Returns True when promoted."""
        self.version(version_id)
        with self.store.transaction() as db:
            promoted = self.set_served(version_id, "promote", actor=actor, reason=reason, only_if_served=parent_id)
            if promoted:
                self.update_run(run_id, status="promoted", finished_at=now(), reason=reason, **fields)
            else:
                self.update_run(run_id, status="passed", finished_at=now(), **fields,
                                reason=self._not_promoted(db, reason, parent_id, "run"))
        return promoted

    @staticmethod
    def _not_promoted(db, reason: str, parent_id: str, during: str) -> str:
        last = db.execute("SELECT version_id FROM serving_log ORDER BY id DESC LIMIT 1").fetchone()
        return (f"{reason}; not promoted: the served version changed from {parent_id} to "
                f"{last[0] if last else None} during the {during}")

    def last_good_versions(self) -> list[str]:
        """Versions served before, newest first, each once: where a restart falls back to."""
        seen: list[str] = []
        for row in reversed(self.serving_history()):
            if row["version_id"] not in seen:
                seen.append(row["version_id"])
        return seen

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
        """A queued run, owned by this process (its pid) until the training process takes
        it over: if the owner dies first, ``unfinished_runs`` shows it with a dead pid."""
        run_id = f"run-{now()[:19].replace(':', '').replace('-', '')}-{new_id()[:6]}"
        with self.store.transaction() as db:
            db["training_runs"].insert({"id": run_id, "status": "queued", "trigger": trigger,
                                        "created_at": now(), "config": _json(config or {}), "pid": os.getpid()})
        return run_id

    def unfinished_runs(self) -> list[dict]:
        """Runs still queued or running (id, status, pid): candidates for reaping."""
        return self.store.query("SELECT id, status, pid FROM training_runs WHERE status IN ('queued', 'running') "
                                "ORDER BY created_at")

    def fail_runs(self, run_ids: list[str], reason: str) -> None:
        """Marks runs failed in one transaction (only those still queued or running)."""
        with self.store.transaction() as db:
            for run_id in run_ids:
                db.execute("UPDATE training_runs SET status = 'failed', finished_at = ?, reason = ? "
                           "WHERE id = ? AND status IN ('queued', 'running')", [now(), reason, run_id])

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
    def start_canary(self, *, run_id: str, version_id: str, parent_id: str, **fields: Any) -> dict | None:
        """Puts a published, gated version on trial: the app serves it as answer B in a share
        of regenerate-and-compare turns until users' votes decide (``retrain.canary``).
        Only while ``parent_id`` is still served (checked in the same transaction): a trial
        against a version a maintainer has since replaced would promote over their choice, so
        then the run is marked passed, not promoted, and None is returned.  ``fields``: more
        columns of the run to write in the same transaction."""
        self.version(version_id)
        state = {"run_id": run_id, "version_id": version_id, "parent_id": parent_id, "started_at": now()}
        with self.store.transaction() as db:
            if not self._still_served(db, parent_id, None):
                fields.pop("reason", None)  # it would say "on trial"
                self.update_run(run_id, status="passed", finished_at=now(), **fields,
                                reason=self._not_promoted(db, "passed the offline gate, not put on trial",
                                                          parent_id, "run"))
                return None
            db["app_state"].upsert({"key": CANARY_KEY, "value": _json(state), "updated_at": now()}, pk="key")
            self.update_run(run_id, status="canary", **fields)
        return state

    def canary(self) -> dict | None:
        """The version on trial, or None."""
        return self.store.get_state(CANARY_KEY) or None

    def end_canary(self, run_id: str, *, promote: bool, reason: str, decision: dict) -> bool:
        """Ends the trial in one transaction: the run becomes promoted (and its version is
        served) or rejected; the canary state is cleared.  A promotion happens only if the
        trial's parent is still served, checked in that transaction: a rollback made after
        the votes were read is never undone (the run is then passed, not promoted).
        Returns True when the candidate was promoted."""
        state = self.canary()
        if not state or state["run_id"] != run_id:
            raise StoreError(f"run {run_id} is not on trial")
        run = self.run(run_id)
        merged = {**(loads(run["decision"]) or {}), "canary": {**decision, "started_at": state["started_at"]}}
        with self.store.transaction() as db:
            db.execute("DELETE FROM app_state WHERE key = ?", [CANARY_KEY])
            status = "promoted" if promote else "rejected"
            if promote and not self._still_served(db, state["parent_id"], None):
                status, reason = "passed", self._not_promoted(db, reason, state["parent_id"], "trial")
            db.execute("UPDATE training_runs SET status = ?, reason = ?, decision = ?, finished_at = ? WHERE id = ?",
                       [status, reason, _json(merged), now(), run_id])
            if status == "promoted":
                db["serving_log"].insert({"version_id": state["version_id"], "action": "promote",
                                          "actor": "canary", "reason": reason, "at": now()})
        return status == "promoted"

    def canary_votes(self, version_id: str, parent_id: str, since: str) -> list[dict]:
        """Users' decided A/B votes between the candidate and its parent since the trial
        began (not excluded, not from opted-out sessions), with each answer's version, the
        voter's ``client`` (its address, hashed; else its browser key; else its session) and
        ``browser`` (its key, hashed; else its session)."""
        return self.store.query(
            "SELECT c.id, c.verdict, c.decided_at, ga.model_version AS a_version, gb.model_version AS b_version, "
            "COALESCE(s.contributor, s.owner, 'session:' || s.id) AS client, "
            "COALESCE(s.owner, 'session:' || s.id) AS browser "
            "FROM comparisons c JOIN sessions s ON s.id = c.session_id "
            "JOIN generations ga ON ga.id = c.a_generation_id JOIN generations gb ON gb.id = c.b_generation_id "
            "WHERE c.verdict IN ('a', 'b', 'tie', 'both_bad') AND c.excluded = 0 AND s.opt_out = 0 "
            "AND c.decided_at >= ? AND ((ga.model_version = ? AND gb.model_version = ?) "
            "OR (ga.model_version = ? AND gb.model_version = ?)) ORDER BY c.decided_at, c.rowid",
            (since, version_id, parent_id, parent_id, version_id))


class Tally(NamedTuple):
    wins: int
    losses: int
    ties: int
    clients: int = 0
    """Distinct clients whose decisive votes were counted."""
    capped: int = 0
    """Decisive votes not counted: past ``per_client`` from one client or one browser."""


def canary_tally(votes: list[dict], version_id: str, per_client: int | None = None) -> Tally:
    """The candidate's wins, losses and ties in ``canary_votes`` rows (a tie or "both bad" is
    a tie), oldest first.  With ``per_client``, at most that many decisive votes count from
    one client and from one browser key, so no one user decides a trial."""
    wins = losses = ties = capped = 0
    counted: dict[str, int] = {}
    clients: set[str] = set()
    for i, v in enumerate(votes):
        if v["verdict"] not in ("a", "b"):
            ties += 1
            continue
        own = str(v.get("id", i))  # a vote without a client is a client of its own
        who = [v.get("client") or own, "browser:" + (v.get("browser") or own)]
        if per_client is not None and any(counted.get(k, 0) >= per_client for k in who):
            capped += 1
            continue
        for k in who:
            counted[k] = counted.get(k, 0) + 1
        clients.add(who[0])
        if (v["a_version"] if v["verdict"] == "a" else v["b_version"]) == version_id:
            wins += 1
        else:
            losses += 1
    return Tally(wins, losses, ties, len(clients), capped)


def loads(text: str | None) -> Any:
    return json.loads(text) if text else None
