"""The coordinator's deployments in SQLite (``--state-db``), so a restarted coordinator comes
back with its models: workers keep serving, re-register, and are linked back by (model,
stage, epoch)."""

from __future__ import annotations

import sqlite3
import threading

from pipeline_core import Plan

from .records import ModelRecord

__all__ = ["StateStore"]


class StateStore:
    """One row per model: its name, checkpoint, plan, mode, device and epoch."""

    def __init__(self, path: str) -> None:
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS models (name TEXT PRIMARY KEY, checkpoint TEXT, "
            "plan TEXT, mode TEXT, device TEXT, epoch INTEGER)"
        )
        self._lock = threading.Lock()

    def save(self, m: ModelRecord) -> None:
        with self._lock:
            self.db.execute(
                "INSERT OR REPLACE INTO models VALUES (?, ?, ?, ?, ?, ?)",
                (m.name, m.checkpoint, m.plan.dumps(), m.mode, m.device, m.epoch),
            )

    def delete(self, name: str) -> None:
        with self._lock:
            self.db.execute("DELETE FROM models WHERE name = ?", (name,))

    def load(self) -> list[ModelRecord]:
        """The saved models, LOADING, no stage placed: their workers relink as they
        heartbeat (:meth:`coordinator.core.Coordinator.relink`)."""
        with self._lock:
            rows = self.db.execute("SELECT * FROM models").fetchall()
        out = []
        for name, checkpoint, plan, mode, device, epoch in rows:
            p = Plan.from_json(plan)
            m = ModelRecord(name, checkpoint, p, [""] * p.num_stages, epoch, mode, device=device)
            m.error = "restoring: waiting for its workers to re-register"
            out.append(m)
        return out
