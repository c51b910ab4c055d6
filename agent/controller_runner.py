"""The live controller of `pipeshift serve --controller auto|propose`: every interval it reads
the workload monitor's window, re-plans with the migration term and asks the decision rule
(planner.adapt.propose -> planner.controller.decide; the rule lives there, not here).

  auto     a decision to act starts the apply through the admin API's own path
           (agent/reconfigurations.py: one apply at a time, refused while another runs);
  propose  a decision to act is recorded as a proposal (a saved plan in the store when the
           server has one: `pipeshift apply` or the planner API apply it), nothing changes;
  off      no loop.

Every decision, acting or not, is logged with its reason and predicted figures, kept (the most
recent MAX_DECISIONS) for `GET /admin/v1/controller`, and, when the server has a store
(`serve --planner-api`), written to it: every decision as a row of `decisions` (`pipeshift
history --decisions` lists them), and a proposal's or a started apply's target as a saved plan
the row names.

The spec the controller plans from is the served deployment's: its devices are the workers
that are alive and not drained (agent/device_fleet.py), named as the workers are; its SLOs and
cost model come from the spec file given to `serve --spec` (or the local CPU defaults).
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from planner.controller import ControllerPolicy, ControllerState

log = logging.getLogger("pipeshift.controller")

Mode = Literal["auto", "propose", "off"]
MODES = ("auto", "propose", "off")
MAX_DECISIONS = 200
DECISIONS_KEPT = 10_000  # the store keeps the newest this many decisions (pruned every PRUNE_EVERY)
PRUNE_EVERY = 100


@dataclass(frozen=True)
class ControllerSettings:
    mode: Mode = "off"
    interval_s: float = 15.0  # between decisions
    min_requests: int = 5  # no decision on a window with fewer arrivals than this
    time_limit_s: float = 5.0  # per planner solve
    policy: ControllerPolicy = field(default_factory=ControllerPolicy)

    def to_json(self) -> dict[str, Any]:
        from dataclasses import asdict

        return {"mode": self.mode, "interval_s": self.interval_s, "min_requests": self.min_requests,
                "time_limit_s": self.time_limit_s, "policy": asdict(self.policy)}


@dataclass
class DecisionRecord:
    id: int
    time: float  # unix
    mode: str
    act: bool
    reason: str
    current: dict[str, Any]  # configuration
    target: dict[str, Any]
    predicted: dict[str, Any]
    workload: dict[str, Any]
    apply_id: str | None = None  # auto: the apply it started
    plan_id: str | None = None  # the store's saved plan (proposal or started apply)
    error: str | None = None  # the apply path refused

    def to_json(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)

    @property
    def verdict(self) -> str:
        """keep | propose | apply (auto started it) | refused (auto, the apply path refused)."""
        if not self.act:
            return "keep"
        if self.mode != "auto":
            return "propose"
        return "apply" if self.apply_id is not None else "refused"


VERDICTS = ("keep", "propose", "apply", "refused")


def finite(figures: dict[str, Any]) -> dict[str, Any]:
    """Returns `figures` with infinite or NaN numbers as None (JSON columns refuse them)."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in figures.items()}


def deployment_spec(template: Any, devices: list[str]) -> Any:
    """Returns `template` with one device per name in `devices` (its first group's kind and
    node): the planner then names stages as the workers are named. The workers are local, so
    they share one host: the first group's node, whose `cpu_cores` the spec may give (the other
    nodes and the links are dropped)."""
    from planner.spec import DeviceGroup

    first = template.devices[0]
    hosts = [n for n in template.nodes or [] if n.name == first.node]
    node = first.node if hosts else "local"
    group = DeviceGroup(kind=first.kind, count=len(devices), node=node, names=list(devices))
    return template.model_copy(update={"devices": [group], "nodes": hosts or None, "links": [], "current": None})


def default_spec(model: str, n_devices: int, cpu_cores: int | None = None,
                 threads_per_worker: int = 1) -> Any:
    """Returns the spec of a local CPU deployment of `model` (the catalog's name) with the
    example spec's SLOs (data/specs/local-cpu-smollm2.yaml): TTFT 5 s, TPOT 1 s. With
    `cpu_cores` (this host's), the workers share them as the planner prices it: four busy
    workers on two cores run at half speed each, and a spare worker costs nothing."""
    from planner.spec import Spec

    nodes = None
    if cpu_cores is not None:
        nodes = [{"name": "local", "nic_gbps": 10, "cpu_cores": cpu_cores,
                  "threads_per_worker": threads_per_worker}]
    return Spec.model_validate({
        "model": model, "dtype": "fp32",
        "devices": [{"kind": "cpu", "count": max(n_devices, 1), "node": "local"}],
        "nodes": nodes,
        "workload": {"request_rate_per_s": 0.5, "prompt_tokens": {"mean": 128}, "output_tokens": {"mean": 64},
                     "batch": 4},
        "slo": {"ttft_ms": 5000, "tpot_ms": 1000},
    })


class ControllerRunner:
    def __init__(self, reconfig: Any, monitor: Any, spec: Any, settings: ControllerSettings,
                 fleet: Any = None, store: Any = None):
        if settings.mode not in MODES:
            raise ValueError(f"controller mode must be one of {', '.join(MODES)}; got {settings.mode!r}")
        self.reconfig, self.monitor, self.spec = reconfig, monitor, spec
        self.settings, self.fleet, self.store = settings, fleet, store
        self.decisions: deque[DecisionRecord] = deque(maxlen=MAX_DECISIONS)
        self.verdicts: dict[str, int] = dict.fromkeys(VERDICTS, 0)  # every decision since start (/metrics)
        self._ids = itertools.count(1)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._step_lock = threading.Lock()

    # ---- the loop ---------------------------------------------------------------------------
    def start(self) -> ControllerRunner:
        if self.settings.mode != "off" and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="controller", daemon=True)
            self._thread.start()
            log.info("controller: %s, a decision every %g s", self.settings.mode, self.settings.interval_s)
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10.0)

    def _run(self) -> None:
        while not self._stop.wait(self.settings.interval_s):
            try:
                self.step()
            except Exception:  # a failed decision must not end the loop
                log.exception("controller: the decision failed")

    # ---- one decision -----------------------------------------------------------------------
    def state(self) -> ControllerState:
        """Returns whether an apply runs and when the last one ended (unix seconds)."""
        applying = any(not r.done.is_set() for r in self.reconfig.history())
        ended = [r.finished_at for r in self.reconfig.history()
                 if r.finished_at is not None and r.outcome == "applied" and r.epoch_to != r.epoch_from]
        return ControllerState(last_apply_end_s=max(ended) if ended else None, applying=applying)

    def step(self, now_s: float | None = None) -> DecisionRecord | None:
        """Makes one decision (and, in auto, starts its apply); None when the window holds
        fewer requests than `min_requests` or the engine is down."""
        from planner.adapt import propose

        with self._step_lock:
            engine = self.reconfig.engine
            if engine.failure:
                return None
            now_s = time.time() if now_s is None else now_s
            if self.monitor.requests_in_window() < self.settings.min_requests:
                return None
            window = self.monitor.window()
            # the backlog is demand too: what waits now must be served within the next interval
            waiting = len(engine.scheduler.waiting) if engine.scheduler else 0
            window = window.with_backlog(waiting, self.settings.interval_s)
            current_config = self.reconfig.current()
            current = [[(s.device, s.start, s.end) for s in p.stages] for p in current_config.pipelines]
            devices = self.fleet.available() if self.fleet is not None else [d.name for d in self.reconfig.devices()]
            devices = list(dict.fromkeys([*devices, *current_config.devices()]))
            requests = self.reconfig.requests()
            in_flight = [(r.pipeline, r.cached_tokens) for r in requests] + [(0, 0)] * waiting
            spec = deployment_spec(self.spec, devices)
            # devices go back on a full window's evidence (planner/adapt.may_shed)
            policy = replace(self.settings.policy, scale_down_window_s=min(
                self.settings.policy.scale_down_window_s, self.monitor.window_s))
            proposal = propose(spec, window, current, in_flight, now_s, self.state(), policy,
                               time_limit_s=self.settings.time_limit_s)
            return self._record(now_s, window, current_config, proposal, len(requests), waiting)

    def _record(self, now_s: float, window: Any, current: Any, proposal: Any, running: int,
                waiting: int) -> DecisionRecord:
        from planner.adapt import configuration

        d = proposal.decision
        target = configuration(proposal.target)
        changes = target.to_json() != current.to_json()
        record = DecisionRecord(
            id=next(self._ids), time=now_s, mode=self.settings.mode, act=d.act and changes, reason=d.reason,
            current=current.to_json(), target=target.to_json(),
            predicted={
                "goodput_current_rps": proposal.current_outlook.goodput_rps,
                "goodput_target_rps": proposal.target_outlook.goodput_rps,
                "devices_current": proposal.current_outlook.devices,
                "devices_target": proposal.target_outlook.devices,
                "value_current": d.value_current, "value_target": d.value_candidate,
                "gain_requests": d.gain, "cost_requests": d.cost, "payback_s": d.payback_s,
                "stall_ms": proposal.stall_s * 1000, "prefetch_s": proposal.prefetch_s,
                "recompute_requests": proposal.change.recompute_requests,
            },
            workload={
                "rate_per_s": window.rate_per_s, "recent_rate_per_s": window.recent_rate_per_s,
                "prompt_tokens_mean": window.prompt.mean,
                "prompt_tokens_p90": window.prompt.p90, "output_tokens_mean": window.output.mean,
                "output_tokens_p90": window.output.p90, "running": running, "waiting": waiting,
            },
        )
        recompute = proposal.recompute_overflow  # the change is applied as propose priced it
        if record.act and self.settings.mode == "auto":
            self._apply(record, target, recompute)
        elif record.act:
            record.plan_id = self._save_plan(record, target, recompute)
        self._store_decision(record)
        self.decisions.append(record)
        self.verdicts[record.verdict] += 1
        verb = {"auto": "apply", "propose": "propose"}.get(self.settings.mode, "decide")
        log.info("controller decision %d: %s %s -> %s: %s (goodput %.3f -> %.3f req/s, stall %.1f ms)%s",
                 record.id, verb if record.act else "keep", current.describe(), target.describe(), d.reason,
                 record.predicted["goodput_current_rps"], record.predicted["goodput_target_rps"],
                 record.predicted["stall_ms"],
                 f"; apply {record.apply_id}" if record.apply_id else (f"; {record.error}" if record.error else ""))
        return record

    def _apply(self, record: DecisionRecord, target: Any, recompute_overflow: bool) -> None:
        """Starts the apply the way `POST /admin/v1/applies` does (never beside another), as
        propose priced it: dropping the KV that does not fit only where it did."""
        from agent.reconfigurations import ApplyRefused
        from planner.configuration import ConfigurationError

        record.plan_id = self._save_plan(record, target, recompute_overflow)
        try:
            started = self.reconfig.start(target, recompute_overflow=recompute_overflow)
        except (ApplyRefused, ConfigurationError) as exc:
            record.error = getattr(exc, "message", str(exc))
            return
        record.apply_id = started.apply_id
        self._record_apply(started, record.plan_id)

    def _record_apply(self, started: Any, plan_id: str | None) -> threading.Thread | None:
        """Writes the apply it started to the store as `pipeshift apply` writes its own: its row
        now, its outcome and the configuration it made (source `controller`) once it ends, then
        the devices it gave back or took, so `pipeshift history` lists them rather than finding
        drift later. Returns the thread that waits for the end (None without a store, or when
        the store fails)."""
        if self.store is None:
            return None
        from planner.deployment_state import ApplyRecorder

        try:
            current = self.store.current()  # _save_plan refreshed it from what serves
            recorder = ApplyRecorder(self.store, current, plan_id, source="controller")
            recorder.started(started.apply_id)
        except Exception:  # the store is a record of decisions, not a condition for them
            log.exception("controller: could not write apply %s to the store", started.apply_id)
            return None

        def finish() -> None:
            from agent.reconfigurations import deployment_json
            from planner.deployment_state import refresh

            started.done.wait()
            try:
                recorder.finished(started.to_json(), self.reconfig.engine.model_name)
                refresh(self.store, deployment_json(self.reconfig.engine, self.fleet))  # devices given back or taken
            except Exception:
                log.exception("controller: could not write the end of apply %s to the store", started.apply_id)

        thread = threading.Thread(target=finish, name=f"record-{started.apply_id}", daemon=True)
        thread.start()
        return thread

    def _save_plan(self, record: DecisionRecord, target: Any, recompute_overflow: bool) -> str | None:
        """Writes the decision's plan to the store (None without one, or when it fails)."""
        if self.store is None:
            return None
        from agent.reconfigurations import deployment_json
        from planner.deployment_state import refresh

        try:
            refreshed = refresh(self.store, deployment_json(self.reconfig.engine, self.fleet))
            plan = self.reconfig.plan(target, recompute_overflow=recompute_overflow)
            diff = plan.to_json()
            row = self.store.save_plan(refreshed.current, target.to_json()["pipelines"], diff,
                                       {**diff.get("prediction", {}), "controller": record.to_json()},
                                       plan.render(), spec=None)
            return row.id
        except Exception:  # the store is a record of decisions, not a condition for them
            log.exception("controller: could not write decision %d to the store", record.id)
            return None

    def _store_decision(self, record: DecisionRecord) -> None:
        """Writes the decision, acting or not, to the store when there is one."""
        if self.store is None:
            return
        from datetime import UTC, datetime

        try:
            self.store.record_decision(
                record.id, record.mode, record.act, record.reason, record.current, record.target,
                finite(record.predicted), finite(record.workload), decided_at=datetime.fromtimestamp(record.time, UTC),
                plan_id=record.plan_id, server_apply_id=record.apply_id, error=record.error)
            if record.id % PRUNE_EVERY == 0:
                self.store.prune_decisions(DECISIONS_KEPT)
        except Exception:  # the store is a record of decisions, not a condition for them
            log.exception("controller: could not write decision %d to the store", record.id)

    # ---- what the admin API shows -----------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {**self.settings.to_json(), "running": self._thread is not None and self._thread.is_alive(),
                "decisions": [r.to_json() for r in self.decisions]}
