"""What one apply did: its phases with start and end, bytes, predicted beside measured figures,
and how it ended. The executor writes it as it goes; the admin API and `pipeshift apply` read it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

PHASES = ("prepare", "prefetch", "precopy", "switch", "cleanup")

# Outcomes: the new configuration serves / nothing changed and the old one serves /
# the switch happened, then requests fell back to the old copies / the apply crashed the
# deployment (never expected; reported so nobody mistakes it for either of the others).
OUTCOMES = ("applied", "aborted", "rolled_back", "failed")


@dataclass
class PhaseRecord:
    name: str
    state: str = "pending"  # pending | running | done | failed | skipped
    started_at: float | None = None  # unix time
    ended_at: float | None = None
    bytes: int = 0
    bytes_expected: int = 0
    predicted_s: float | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    _t0: float = 0.0

    @property
    def measured_s(self) -> float | None:
        if self.started_at is None:
            return None
        end = self.ended_at if self.ended_at is not None else time.time()
        return end - self.started_at

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "state": self.state, "started_at": self.started_at,
            "ended_at": self.ended_at, "measured_s": self.measured_s, "predicted_s": self.predicted_s,
            "bytes": self.bytes, "bytes_expected": self.bytes_expected, **self.detail,
        }


@dataclass
class ApplyRecord:
    apply_id: str
    epoch_from: int
    epoch_to: int
    plan: dict[str, Any]
    target: dict[str, Any]
    state: str = "running"  # running | done
    outcome: str | None = None
    error: str | None = None
    cancel_requested: bool = False
    created_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    stall_ms: float | None = None  # longest time a request was held at the switch
    stall_ms_by_request: dict[str, float] = field(default_factory=dict)
    bytes_moved: int = 0
    phases: dict[str, PhaseRecord] = field(default_factory=lambda: {n: PhaseRecord(n) for n in PHASES})
    text: str = ""  # the plan as `pipeshift plan` prints it
    kv_mode: str = "copy"  # "copy" moves running requests' KV; "recompute" drops and recomputes it
    done: threading.Event = field(default_factory=threading.Event)
    # Called with (record, phase, "begin" | "end") in the executor's thread, before it goes on.
    listeners: list[Callable[[ApplyRecord, str, str], None]] = field(default_factory=list)

    def begin(self, phase: str, predicted_s: float | None = None, bytes_expected: int = 0) -> PhaseRecord:
        record = self.phases[phase]
        record.state, record.started_at = "running", time.time()
        record.predicted_s, record.bytes_expected = predicted_s, bytes_expected
        self._notify(phase, "begin")
        return record

    def end(self, phase: str, state: str = "done") -> None:
        record = self.phases[phase]
        if record.state == "running":
            record.state, record.ended_at = state, time.time()
            self._notify(phase, "end")

    def _notify(self, phase: str, event: str) -> None:
        for listener in self.listeners:
            try:
                listener(self, phase, event)
            except Exception:  # an observer must not break the apply
                log.exception("apply listener failed at %s %s", phase, event)

    def finish(self, outcome: str, error: str | None = None) -> None:
        for record in self.phases.values():
            if record.state == "running":
                record.state, record.ended_at = ("done" if outcome == "applied" else "failed"), time.time()
            elif record.state == "pending":
                record.state = "skipped"
        self.outcome, self.error = outcome, error
        self.state, self.finished_at = "done", time.time()
        self.done.set()

    @property
    def current_phase(self) -> str | None:
        return next((p.name for p in self.phases.values() if p.state == "running"), None)

    def to_json(self) -> dict[str, Any]:
        prediction = self.plan.get("prediction", {})
        return {
            "id": self.apply_id,
            "state": self.state,
            "outcome": self.outcome,
            "error": self.error,
            "epoch_from": self.epoch_from,
            "epoch_to": self.epoch_to,
            "phase": self.current_phase,
            "cancel_requested": self.cancel_requested,
            "kv": self.kv_mode,
            "created_at": self.created_at,
            "finished_at": self.finished_at,
            "phases": [p.to_json() for p in self.phases.values()],
            "measured": {
                "stall_ms": self.stall_ms,
                "requests_moved": len(self.stall_ms_by_request),
                "bytes_moved": self.bytes_moved,
                "prefetch_s": self.phases["prefetch"].measured_s,
                "precopy_s": self.phases["precopy"].measured_s,
                "switch_s": self.phases["switch"].measured_s,
                "total_s": None if self.finished_at is None else self.finished_at - self.created_at,
            },
            "predicted": {
                "stall_ms": prediction.get("stall_ms"),
                "bytes_moved": prediction.get("bytes_total"),
                "prefetch_s": prediction.get("prefetch_s"),
                "precopy_s": prediction.get("precopy_s"),
            },
            "target": self.target,
            "text": self.text,
            "plan": self.plan,
        }
