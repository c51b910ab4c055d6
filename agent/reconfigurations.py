"""A serving engine's reconfigurations: plan one against what serves now, apply one at a time,
remember every apply. The admin API (agent/gateway/admin.py) is a thin layer over this.
"""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections.abc import Collection
from typing import Any

from agent.apply_record import ApplyRecord
from agent.engine import PipelineEngine, worker_name
from agent.executor import ApplyExecutor, configuration_of
from planner.configuration import Configuration, ConfigurationError
from planner.reconfig import (
    DeviceInfo,
    ModelFootprint,
    ReconfigPlan,
    RequestKV,
    plan_reconfiguration,
)


def down_message(failure: str) -> str:
    """Says that the deployment is down and what to do: a stage lost outside an apply is not
    replaced live."""
    return (f"the deployment is down: {failure}; a stage lost outside an apply is not replaced live: "
            "restart `pipeshift serve` (then `pipeshift rollback` returns it to a recorded configuration)")


class ApplyRefused(Exception):
    """An apply that cannot start; `status` is the HTTP status that says whose move it is."""

    def __init__(self, message: str, status: int = 409, plan: ReconfigPlan | None = None):
        super().__init__(message)
        self.message, self.status, self.plan = message, status, plan


class Reconfigurations:
    def __init__(self, engine: PipelineEngine):
        self.engine = engine
        self.records: dict[str, ApplyRecord] = {}
        self.active: ApplyExecutor | None = None
        self._lock = threading.Lock()
        self._serial = itertools.count(1)
        # Called at every phase boundary of every apply (see ApplyRecord.listeners).
        self.observers: list = []
        engine.worker_lost_hook = self._on_worker_lost
        engine.pipeline_broken_hook = self._on_pipeline_broken

    # ---- what the planner sees --------------------------------------------------------------
    def current(self) -> Configuration:
        return configuration_of(self.engine)

    def devices(self) -> list[DeviceInfo]:
        engine = self.engine
        kind = "cpu" if engine.config.device == "cpu" else engine.config.device
        return [
            DeviceInfo(worker_name(w), kind, "local", engine.memory_budget_bytes, engine.config.kv_cache_bytes)
            for w, info in sorted(engine.worker_info.items()) if info.alive
        ]

    def footprint(self) -> ModelFootprint:
        engine, parts = self.engine, self.engine.part_bytes
        arch = engine.arch
        # Parts no worker holds yet are priced as fp32 (what workers run).
        layer = parts.get("layer") or arch.params_per_layer * 4
        embed = parts.get("embed") or arch.embedding_params * 4
        head = parts.get("head") or (arch.hidden_size + arch.embedding_params) * 4
        return ModelFootprint(arch.n_layers, layer, embed, head, engine.kv_bytes_per_token_per_layer,
                              engine.config.block_size)

    def requests(self) -> list[RequestKV]:
        """Returns the running requests as the plan sees them (asks the scheduler thread)."""
        engine = self.engine
        index = {r.pipeline_id: i for i, r in enumerate(sorted(engine.serving_pipelines(), key=lambda r: r.pipeline_id))}

        def snapshot() -> list[RequestKV]:
            return [RequestKV(s.request_id, index[s.pipeline_id], s.num_computed, s.reserved_blocks)
                    for s in engine.scheduler.running if s.pipeline_id in index]

        return engine.on_scheduler(snapshot)

    def plan(self, target: Configuration, max_overhead: float | None = None,
             recompute_overflow: bool = False, exclude: Collection[str] = ()) -> ReconfigPlan:
        """Returns the plan from what serves now to `target`; raises ConfigurationError.
        `recompute_overflow`: requests whose KV memory cannot hold through the change recompute
        it instead of refusing the plan (planner/reconfig.py, `choose_recompute`).
        `exclude`: devices the plan may not place a stage on (drained ones), unless they serve now."""
        engine = self.engine
        if engine.failure:  # a dry run too: no plan of a deployment that cannot apply it
            raise ApplyRefused(down_message(engine.failure), status=503)
        current = self.current()
        left_out = [d.name for d in self.devices() if d.name in exclude and d.name not in current.devices()]
        devices = [d for d in self.devices() if d.name not in left_out]
        try:
            target.check(engine.arch.n_layers, [d.name for d in devices])
        except ConfigurationError as exc:
            if not left_out:
                raise
            raise ConfigurationError(f"{exc} ({', '.join(left_out)} drained: `pipeshift device add` "
                                     "makes a device available again)") from None
        return plan_reconfiguration(
            current, target, devices, self.footprint(), self.requests(), epoch=engine.epoch,
            max_overhead=max_overhead or engine.config.max_overhead, recompute_overflow=recompute_overflow,
        )

    # ---- applies --------------------------------------------------------------------------
    def start(self, target: Configuration, max_overhead: float | None = None,
              expected_epoch: int | None = None, kv: str = "copy",
              recompute_overflow: bool = False, exclude: Collection[str] = ()) -> ApplyRecord:
        """Plans and starts an apply in the background; raises ApplyRefused, ConfigurationError.
        `exclude`: as for `plan`."""
        engine = self.engine
        with self._lock:
            if engine.failure:
                raise ApplyRefused(down_message(engine.failure), status=503)
            if self.active is not None and not self.active.record.done.is_set():
                rec = self.active.record
                raise ApplyRefused(f"apply {rec.apply_id} is in progress (phase {rec.current_phase}): "
                                   "wait for it, or cancel it")
            if expected_epoch is not None and expected_epoch != engine.epoch:
                raise ApplyRefused(f"the plan was made at epoch {expected_epoch}, the deployment is now at "
                                   f"epoch {engine.epoch}: plan again")
            plan = self.plan(target, max_overhead, recompute_overflow, exclude)
            if not plan.feasible:
                raise ApplyRefused("the target cannot be applied: " + "; ".join(plan.problems), plan=plan)
            apply_id = f"apply-{next(self._serial)}-{uuid.uuid4().hex[:6]}"
            record = ApplyRecord(apply_id, plan.epoch_from, plan.epoch_to, plan.to_json(), plan.target.to_json(),
                                 text=plan.render(), listeners=list(self.observers))
            self.records[apply_id] = record
            if not plan.has_changes:
                record.epoch_to = plan.epoch_from
                record.finish("applied", None)
                return record
            record.kv_mode = kv
            self.active = ApplyExecutor(engine, plan, record, max_overhead or engine.config.max_overhead, kv)
            threading.Thread(target=self.active.run, name=f"apply-{apply_id}", daemon=True).start()
            return record

    def get(self, apply_id: str) -> ApplyRecord | None:
        return self.records.get(apply_id)

    def cancel(self, apply_id: str) -> ApplyRecord | None:
        """Asks an apply to stop: before its switch it aborts; from the switch on it completes."""
        record = self.records.get(apply_id)
        active = self.active
        if record is None or record.done.is_set():
            return record
        record.cancel_requested = True
        if active is not None and active.record is record and not active.switch_started:
            active.cancel.set()
        return record

    def _on_worker_lost(self, worker_id: int, reason: str) -> bool:
        active = self.active
        if active is None or active.record.done.is_set():
            return False
        return active.on_worker_lost(worker_id, reason)

    def _on_pipeline_broken(self, pipeline_id: int) -> bool:
        """A new pipeline of the apply in progress broke: the apply rolls back (once the lost
        worker is found, or when its new pipelines make no token in time)."""
        active = self.active
        if active is None or active.record.done.is_set() or active.committed:
            return False
        return any(r.pipeline_id == pipeline_id for r in active.new.values())

    def stats(self) -> dict[str, float]:
        records = list(self.records.values())
        running = [r for r in records if not r.done.is_set()]
        return {"apply_in_progress": float(bool(running))}

    def history(self) -> list[ApplyRecord]:
        return sorted(self.records.values(), key=lambda r: r.created_at)


def deployment_json(engine: PipelineEngine, fleet: Any = None) -> dict[str, Any]:
    """Returns what `GET /admin/v1/deployment` answers: configuration, epoch, devices, memory;
    with the deployment's `fleet` (agent/device_fleet.py), a drained or draining device says so."""
    reconfig: Reconfigurations = engine.reconfig
    serving = {s.worker_id: (i, s) for i, p in enumerate(engine.serving_pipelines()) for s in p.stages}
    kind = "cpu" if engine.config.device == "cpu" else engine.config.device
    sched = engine.scheduler
    devices = []
    for w, info in sorted(engine.worker_info.items()):
        placed = serving.get(w)
        devices.append({
            "name": info.name,
            "pid": engine.workers[w].pid if w in engine.workers else None,
            "kind": kind,
            "state": (fleet.state(info.name) if fleet is not None else None)
            or ("dead" if not info.alive else ("serving" if placed else "spare")),
            "pipeline": None if placed is None else placed[0],
            "layers": None if placed is None else [placed[1].start, placed[1].end],
            "held_layers": info.layers,
            "kv_blocks": info.num_blocks,
            "kv_blocks_reserved": sched.worker_used.get(w, 0) if sched else 0,
            "rss_bytes": info.rss_bytes,
            "memory_budget_bytes": engine.memory_budget_bytes,
            "kv_cap_bytes": engine.config.kv_cache_bytes,
        })
    active = reconfig.active
    return {
        "model": engine.model_name,
        "epoch": engine.epoch,
        "healthy": engine.failure is None,
        "failure": engine.failure,
        "configuration": reconfig.current().to_json(),
        "devices": devices,
        "block_size": engine.config.block_size,
        "running_requests": len(sched.running) if sched else 0,
        "waiting_requests": len(sched.waiting) if sched else 0,
        "apply_in_progress": None if active is None or active.record.done.is_set() else active.record.apply_id,
        "max_overhead": engine.config.max_overhead,
        "time": time.time(),
    }

