"""The live controller's loop around the decision rule: it reads the monitor's window, asks
planner.adapt.propose, and in auto starts the apply through the reconfigurations' own path,
in propose only records it; every decision keeps its reason and predicted figures."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import pytest

from agent.controller_runner import ControllerRunner, ControllerSettings, default_spec
from agent.reconfigurations import ApplyRefused
from agent.workload_monitor import WorkloadMonitor
from planner.configuration import Configuration
from planner.controller import ControllerPolicy
from planner.reconfig import DeviceInfo

WORKERS = [f"worker-{i}" for i in range(4)]
POLICY = ControllerPolicy(min_dwell_s=30, payback_horizon_s=60)


@dataclass
class Record:
    apply_id: str
    done: threading.Event = field(default_factory=threading.Event)
    finished_at: float | None = None
    outcome: str | None = None
    epoch_from: int = 1
    epoch_to: int = 2


@dataclass
class Sched:
    waiting: list = field(default_factory=list)


@dataclass
class Eng:
    failure: str | None = None
    scheduler: Sched = field(default_factory=Sched)


class Reconfig:
    """What the runner reads of agent.reconfigurations.Reconfigurations, serving `stages`."""

    def __init__(self, stages: str):
        self.engine = Eng()
        self.config = Configuration.from_stages_text(stages, WORKERS)
        self.started: list[Configuration] = []
        self.records: list[Record] = []

    def current(self) -> Configuration:
        return self.config

    def devices(self) -> list[DeviceInfo]:
        return [DeviceInfo(w, "cpu", "local", 4 << 30, 1 << 30) for w in WORKERS]

    def requests(self) -> list:
        return []

    def history(self) -> list[Record]:
        return self.records

    def start(self, target: Configuration, recompute_overflow: bool = False) -> Record:
        if any(not r.done.is_set() for r in self.records):
            raise ApplyRefused("apply apply-1 is in progress")
        self.started.append(target)
        self.recompute_overflow = recompute_overflow
        self.records.append(Record(f"apply-{len(self.records) + 1}"))
        return self.records[-1]


def burst(rate_per_s: float, prompt: int = 20, output: int = 32) -> WorkloadMonitor:
    """Returns a monitor that saw 30 s of requests at `rate_per_s`."""
    clock = [0.0]
    monitor = WorkloadMonitor(window_s=30, clock=lambda: clock[0])
    n = int(rate_per_s * 30)
    for i in range(n):
        clock[0] = 30 * (i + 1) / n
        monitor.admitted(prompt)
    from agent.workload_monitor import Finished

    for _ in range(n):
        monitor.finished(Finished(clock[0], clock[0] - 1, prompt, output, 0.2, 0.05, 0, False))
    return monitor


def runner(mode: str, reconfig: Reconfig, monitor: WorkloadMonitor) -> ControllerRunner:
    settings = ControllerSettings(mode=mode, interval_s=5, policy=POLICY, time_limit_s=2)
    return ControllerRunner(reconfig, monitor, default_spec("SmolLM2-135M", 4), settings)


def test_auto_applies_a_change_that_pays_back_and_never_two_at_once() -> None:
    reconfig = Reconfig("0:15,15:30")
    control = runner("auto", reconfig, burst(5.0))
    first = control.step(now_s=1000.0)
    assert first.act and first.apply_id == "apply-1" and first.error is None
    assert reconfig.started and len(reconfig.started[0].pipelines) > 1  # replicas for the burst
    # the policy's default: KV that does not fit may be dropped out of a configuration losing
    # requests, as one pipeline is in this burst (test_serve_takes_the_mode_from_the_flag_or_the_spec)
    assert reconfig.recompute_overflow is True
    assert first.predicted["goodput_target_rps"] > first.predicted["goodput_current_rps"]
    assert "gains" in first.reason and first.workload["rate_per_s"] == pytest.approx(5.0)
    second = control.step(now_s=1001.0)  # the first apply still runs
    assert not second.act and "never two at once" in second.reason and len(reconfig.started) == 1
    assert [d["id"] for d in control.to_json()["decisions"]] == [1, 2]


def test_propose_records_the_plan_and_changes_nothing() -> None:
    reconfig = Reconfig("0:15,15:30")
    decision = runner("propose", reconfig, burst(5.0)).step(now_s=1000.0)
    assert decision.act and decision.apply_id is None and reconfig.started == []
    assert decision.target != decision.current


def test_dwell_holds_a_change_that_only_saves_devices() -> None:
    reconfig = Reconfig("0:15,15:30")
    reconfig.records.append(Record("apply-0", finished_at=990.0, outcome="applied"))
    reconfig.records[0].done.set()
    decision = runner("auto", reconfig, burst(0.5)).step(now_s=1000.0)  # light load: fewer devices pay
    assert not decision.act and decision.reason.startswith("dwell") and reconfig.started == []


def test_no_decision_on_a_quiet_window() -> None:
    assert runner("auto", Reconfig("0:30"), WorkloadMonitor(window_s=30)).step() is None
    with pytest.raises(ValueError, match="auto, propose, off"):
        ControllerRunner(Reconfig("0:30"), WorkloadMonitor(), None, ControllerSettings(mode="sometimes"))


def test_serve_takes_the_mode_from_the_flag_or_the_spec() -> None:
    import argparse

    from agent.serve_command import controller_settings, register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    spec = default_spec("SmolLM2-135M", 2).model_copy(update={"controller": "propose"})
    args = parser.parse_args(["serve", "--controller-dwell", "20"])
    settings = controller_settings(args, spec)
    assert settings.mode == "propose" and settings.policy.min_dwell_s == 20
    assert controller_settings(parser.parse_args(["serve"]), None).mode == "off"
    assert not settings.policy.recompute_overflow
    recompute = controller_settings(parser.parse_args(["serve", "--controller-recompute"]), None)
    assert recompute.policy.recompute_overflow
    # and the runner's applies ask for what its decisions priced
    from dataclasses import replace

    reconfig = Reconfig("0:15,15:30")
    control = ControllerRunner(reconfig, burst(5.0), default_spec("SmolLM2-135M", 4), ControllerSettings(
        mode="auto", interval_s=5, policy=replace(POLICY, recompute_overflow=True), time_limit_s=2))
    assert control.step(now_s=1000.0).act and reconfig.recompute_overflow is True
    # by default only out of a configuration that loses requests: a burst of 5 req/s on one
    # pipeline does; with --controller-recompute-when-losing 1 the runner never asks
    for flags, asked in (([], True), (["--controller-recompute-when-losing", "1"], False)):
        policy = controller_settings(parser.parse_args(["serve", *flags]), None).policy
        assert policy.recompute_when_losing == (0.1 if asked else 1.0)  # 1: no configuration loses more
        reconfig = Reconfig("0:15,15:30")
        control = ControllerRunner(reconfig, burst(5.0), default_spec("SmolLM2-135M", 4), ControllerSettings(
            mode="auto", interval_s=5, policy=replace(policy, min_dwell_s=30, payback_horizon_s=60),
            time_limit_s=2))
        assert control.step(now_s=1000.0).act and reconfig.recompute_overflow is asked
    with pytest.raises(ValueError, match="--controller-recompute-when-losing is a share"):
        controller_settings(parser.parse_args(["serve", "--controller-recompute-when-losing", "2"]), None)
    assert controller_settings(parser.parse_args(["serve", "--controller", "auto"]), spec).mode == "auto"
    with pytest.raises(ValueError, match="--controller-interval must be positive"):
        controller_settings(parser.parse_args(["serve", "--controller-interval", "0"]), None)


def test_every_decision_acting_or_not_is_written_to_the_store(tmp_path) -> None:
    from datetime import UTC

    from planner.store import init_schema, open_store

    url = f"sqlite:///{tmp_path / 'store.db'}"
    init_schema(url)
    store = open_store(url)
    try:
        reconfig = Reconfig("0:15,15:30")
        settings = ControllerSettings(mode="auto", interval_s=5, policy=POLICY, time_limit_s=2)
        control = ControllerRunner(reconfig, burst(5.0), default_spec("SmolLM2-135M", 4), settings, store=store)
        acted = control.step(now_s=1000.0)
        kept = control.step(now_s=1001.0)  # the first apply still runs
        rows = store.decisions()
        assert [(r.serial, r.mode, r.act) for r in rows] == [(1, "auto", True), (2, "auto", False)]
        assert [r.reason for r in rows] == [acted.reason, kept.reason] and "never two at once" in rows[1].reason
        assert rows[0].server_apply_id == "apply-1" and rows[1].server_apply_id is None
        assert rows[0].predicted == acted.predicted and rows[0].workload == acted.workload
        assert rows[0].current == acted.current and rows[0].target == acted.target != acted.current
        assert rows[0].decided_at.replace(tzinfo=UTC).timestamp() == pytest.approx(1000.0)
    finally:
        store.close()


def test_a_store_that_fails_loses_the_record_not_the_decision(tmp_path) -> None:
    class Broken:
        def record_decision(self, *args, **kwargs):
            raise OSError("disk full")

        def save_plan(self, *args, **kwargs):
            raise OSError("disk full")

    reconfig = Reconfig("0:15,15:30")
    settings = ControllerSettings(mode="auto", interval_s=5, policy=POLICY, time_limit_s=2)
    control = ControllerRunner(reconfig, burst(5.0), default_spec("SmolLM2-135M", 4), settings, store=Broken())
    decision = control.step(now_s=1000.0)
    assert decision.act and decision.apply_id == "apply-1" and len(reconfig.started) == 1
    assert [d["id"] for d in control.to_json()["decisions"]] == [1]


def test_serve_of_a_model_outside_the_catalog_starts_with_the_controller_off() -> None:
    """`serve --model DIR` (any GGUF or safetensors directory, named as its file or folder) has
    no catalog entry to plan with: with the controller off it serves (the monitor keeps its
    default SLOs); a controller that would plan says to give --spec instead of a traceback."""
    import argparse
    from types import SimpleNamespace

    from agent.serve_command import register, start_controller
    from agent.workload_monitor import SloTargets

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    engine = SimpleNamespace(model_name="my-llama", worker_info=[object(), object()], reconfig=Reconfig("0:30"))
    for model in ("models/my-llama", "models/my-llama.gguf"):
        app = SimpleNamespace(state=SimpleNamespace(workload_monitor=WorkloadMonitor(), device_fleet=None))
        args = parser.parse_args(["serve", "--model", model, "--workload-window", "30"])
        runner = start_controller(app, engine, args, None, ControllerSettings(mode="off"))
        assert app.state.controller is runner and runner.spec is None
        assert runner.to_json()["mode"] == "off" and not runner.to_json()["running"]
        assert app.state.workload_monitor.window_s == 30
        assert app.state.workload_monitor.slo == SloTargets()
        with pytest.raises(ValueError, match="--spec naming a catalog model"):
            start_controller(app, engine, args, None, ControllerSettings(mode="auto"))
    # a catalog model still gets the default spec, by the engine's name or by --model
    app = SimpleNamespace(state=SimpleNamespace(workload_monitor=WorkloadMonitor(), device_fleet=None))
    args = parser.parse_args(["serve", "--model", "smollm2-135m"])
    runner = start_controller(app, engine, args, None, ControllerSettings(mode="off"))
    assert runner.spec.model == "SmolLM2-135M"


def test_metrics_count_the_decisions_by_verdict() -> None:
    from agent.metrics import GatewayMetrics

    reconfig = Reconfig("0:15,15:30")
    control = runner("auto", reconfig, burst(5.0))
    metrics = GatewayMetrics()
    metrics.watch_controller(control)
    assert 'pipeshift_controller_decisions_total{verdict="apply"} 0.0' in metrics.render()[0].decode()
    control.step(now_s=1000.0)  # applies
    control.step(now_s=1001.0)  # keeps: the first apply still runs
    text = metrics.render()[0].decode()
    for line in ('pipeshift_controller_mode{mode="auto"} 1.0', 'pipeshift_controller_mode{mode="propose"} 0.0',
                 'pipeshift_controller_decisions_total{verdict="apply"} 1.0',
                 'pipeshift_controller_decisions_total{verdict="keep"} 1.0',
                 'pipeshift_controller_decisions_total{verdict="refused"} 0.0',
                 "pipeshift_controller_last_decision_timestamp_seconds 1001.0"):
        assert line in text, line
    proposing = runner("propose", Reconfig("0:15,15:30"), burst(5.0))
    proposing.step(now_s=1000.0)
    assert proposing.verdicts == {"keep": 0, "propose": 1, "apply": 0, "refused": 0}


def test_an_apply_of_auto_is_in_the_store_as_an_apply_of_the_cli(tmp_path, monkeypatch) -> None:
    """`pipeshift history` lists the controller's apply with its outcome and the configuration
    it made (source `controller`), rather than finding that configuration later as drift, and
    the devices it took or gave back."""
    import agent.reconfigurations
    from planner.store import init_schema, open_store

    url = f"sqlite:///{tmp_path / 'store.db'}"
    init_schema(url)
    store = open_store(url)
    try:
        reconfig = Reconfig("0:15,15:30")
        reconfig.engine.model_name = "SmolLM2-135M"
        serving = [reconfig.config]  # what GET /admin/v1/deployment would answer serves

        def deployment(engine, fleet=None) -> dict:
            used = set(serving[-1].devices())
            return {"model": "SmolLM2-135M", "epoch": len(serving), "configuration": serving[-1].to_json(),
                    "devices": [{"name": w, "state": "serving" if w in used else "spare"} for w in WORKERS]}

        monkeypatch.setattr(agent.reconfigurations, "deployment_json", deployment)
        before = store.record_configuration("SmolLM2-135M", reconfig.config.to_json()["pipelines"], "observed")
        settings = ControllerSettings(mode="auto", interval_s=5, policy=POLICY, time_limit_s=2)
        control = ControllerRunner(reconfig, burst(5.0), default_spec("SmolLM2-135M", 4), settings, store=store)
        decision = control.step(now_s=1000.0)
        [row] = store.applies()
        assert (row.state, row.server_apply_id, row.from_id) == ("running", "apply-1", before.id)
        target = reconfig.started[0].to_json()
        record = reconfig.records[0]
        record.to_json = lambda: {"outcome": "applied", "error": None, "epoch_to": 2, "target": target,
                                  "predicted": {}, "phases": [], "measured": {"bytes_moved": 7, "stall_ms": 0.5}}
        serving.append(reconfig.started[0])
        record.done.set()
        for thread in threading.enumerate():
            if thread.name == "record-apply-1":
                thread.join(10)
        [row] = store.applies()
        after = store.current()
        assert (row.state, row.outcome, row.to_id, row.bytes_moved, row.source) == (
            "done", "applied", after.id, 7, "controller")
        assert (after.source, after.pipelines) == ("controller", target["pipelines"])
        assert [c.source for c in store.configurations()] == ["observed", "controller"]  # no drift
        moved = [(e["device"], e["from"], e["to"]) for e in store.history() if e["type"] == "device" and e["from"]]
        used = set(reconfig.started[0].devices())
        assert moved and moved == [(w, "spare" if w in used else "serving", "serving" if w in used else "spare")
                                   for w in WORKERS if (w in used) != (w in reconfig.config.devices())]
        assert decision.apply_id == "apply-1"
    finally:
        store.close()


def test_on_a_host_of_two_cores_a_surge_takes_two_workers_not_four() -> None:
    """Local workers share this host's cores (serve passes them to the spec): on 2 cores, a
    third and fourth replica would only split them, so a surge takes a second worker and no
    more; a spare worker costs nothing, so one replica alone runs at full speed. With a core
    per worker the same surge takes all four."""
    from agent.controller_runner import deployment_spec

    def target(cores: int | None, start: str, rate: float) -> list[list[tuple[str, int, int]]]:
        settings = ControllerSettings(mode="propose", interval_s=5, policy=POLICY, time_limit_s=2)
        spec = default_spec("SmolLM2-135M", 4, cores)
        decision = ControllerRunner(Reconfig(start), burst(rate), spec, settings).step(now_s=1000.0)
        assert decision.act, decision.reason
        return [[(s["device"], s["start"], s["end"]) for s in p["stages"]]
                for p in decision.target["pipelines"]]

    assert sorted(target(2, "0:30", 3.0)) == [[("worker-0", 0, 30)], [("worker-1", 0, 30)]]
    # past what even two serve, it still takes the second (capacity, not goodput, tells)
    assert len(target(2, "0:30", 8.0)) == 2
    assert len(target(2, "0:15,15:30", 8.0)) == 2
    assert len(target(None, "0:30", 8.0)) == 4
    # the planning spec keeps the host the template describes
    planned = deployment_spec(default_spec("SmolLM2-135M", 4, 2), WORKERS[:3])
    assert [n.cpu_cores for n in planned.nodes] == [2]
    assert {node for _, _, node in planned.device_names()} == {"local"}


def test_a_burst_in_the_window_last_quarter_takes_a_worker_before_the_mean_shows_it() -> None:
    """15 s at 0.4 req/s, then 5 s at 3 req/s: the window's mean (1.05 req/s) is well within
    one worker, its last quarter is not. Capacity is added on that first evidence."""
    from agent.workload_monitor import Finished

    def monitor(arrivals: list[float]) -> WorkloadMonitor:
        clock = [0.0]
        m = WorkloadMonitor(window_s=20, clock=lambda: clock[0])
        for t in arrivals:
            clock[0] = t
            m.admitted(20)
            m.finished(Finished(t, t - 1, 20, 32, 0.2, 0.05, 0, False))
        clock[0] = 20.0
        return m

    quiet = [i * 2.5 for i in range(6)]
    rising = monitor(quiet + [15 + i / 3 for i in range(1, 16)])
    even = monitor([i * 20 / 21 for i in range(21)])  # the same 21 requests, evenly
    settings = ControllerSettings(mode="propose", interval_s=5, policy=POLICY, time_limit_s=2)
    spec = default_spec("SmolLM2-135M", 4, 2)
    decision = ControllerRunner(Reconfig("0:30"), rising, spec, settings).step(now_s=1000.0)
    assert decision.act and len(decision.target["pipelines"]) == 2, decision.reason
    assert decision.workload["recent_rate_per_s"] == pytest.approx(3.0)
    calm = ControllerRunner(Reconfig("0:30"), even, spec, settings).step(now_s=1000.0)
    assert not calm.act, calm.reason
