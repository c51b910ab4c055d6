"""Draining plans the least movement that frees a device; adding starts a worker for a new name,
re-admits a drained one, and refuses what it cannot do with what to do instead."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from agent.device_fleet import DeviceFleet, DeviceRefused, drain_target
from agent.engine import WorkerInfo
from agent.reconfigurations import Reconfigurations
from planner.configuration import Configuration, ConfigurationError
from planner.reconfig import DeviceInfo, ModelFootprint


def config(text: str) -> Configuration:
    """Returns pipelines written `w0:0-15,w1:15-30; w2:0-30`."""
    pipelines = []
    for p in text.split(";"):
        stages = []
        for s in p.split(","):
            device, layers = s.strip().split(":")
            start, end = layers.split("-")
            stages.append({"device": device, "start": int(start), "end": int(end)})
        pipelines.append({"stages": stages})
    return Configuration.from_json({"pipelines": pipelines})


def test_a_spare_takes_the_stage_as_it_is() -> None:
    target = drain_target(config("w0:0-10,w1:10-20,w2:20-30"), "w1", ["w3"])
    assert target == config("w0:0-10,w3:10-20,w2:20-30")


def test_without_a_spare_the_neighbour_takes_the_layers() -> None:
    current = config("w0:0-10,w1:10-20,w2:20-30")
    assert drain_target(current, "w1", []) == config("w0:0-20,w2:20-30")
    assert drain_target(current, "w0", []) == config("w1:0-20,w2:20-30")
    assert drain_target(current, "w2", []) == config("w0:0-10,w1:10-30")


def test_a_single_stage_pipeline_goes_while_another_serves() -> None:
    current = config("w0:0-30; w1:0-15,w2:15-30")
    assert drain_target(current, "w0", []) == config("w1:0-15,w2:15-30")
    target = drain_target(current, "w2", [])
    assert target == config("w0:0-30; w1:0-30")
    target.check(30)


def test_the_last_device_cannot_be_drained() -> None:
    with pytest.raises(DeviceRefused, match="only device serving"):
        drain_target(config("w0:0-30"), "w0", [])


# ---- adding devices: what the fleet decides before and after the engine starts a worker -----

class FakeEngine:
    """What the fleet reads of agent.engine.PipelineEngine; `add_worker` records the ids asked."""

    def __init__(self, n_workers: int, device: str = "cpu"):
        self.config = SimpleNamespace(device=device, kv_cache_bytes=64 << 20)
        self.memory_budget_bytes = 4 << 30
        self.failure = None
        self.worker_info = {w: WorkerInfo(w) for w in range(n_workers)}
        self.workers = {w: SimpleNamespace(pid=1000 + w) for w in range(n_workers)}
        self.started: list[int] = []

    def add_worker(self, worker_id: int) -> WorkerInfo:
        self.started.append(worker_id)
        self.workers[worker_id] = SimpleNamespace(pid=1000 + worker_id)
        self.worker_info[worker_id] = WorkerInfo(worker_id)
        return self.worker_info[worker_id]


class FakeReconfig:
    def __init__(self, engine: FakeEngine):
        self.engine = engine

    def devices(self) -> list[DeviceInfo]:
        return [DeviceInfo(i.name, "cpu", "local", 4 << 30, 64 << 20) for i in self.engine.worker_info.values()
                if i.alive]

    def current(self) -> Configuration:
        return config("worker-0:0-30")

    def footprint(self) -> ModelFootprint:
        return ModelFootprint(30, 18 << 20, 110 << 20, 110 << 20, 1536, 16)


def fleet(n_workers: int = 2, **kwargs) -> tuple[DeviceFleet, FakeEngine]:
    engine = FakeEngine(n_workers)
    return DeviceFleet(FakeReconfig(engine), **kwargs), engine


def test_a_new_name_starts_a_worker_that_the_planner_may_then_use() -> None:
    devices, engine = fleet(memory_available=lambda: 16 << 30)
    added, message, started = devices.add("worker-2")
    assert (added, started, engine.started) == (["worker-2"], True, [2])
    assert "worker-2 is up (pid 1002), a spare holding no layers" in message
    assert devices.available() == ["worker-0", "worker-1", "worker-2"]
    assert devices.add("worker-7", kind="cpu")[0] == ["worker-7"]  # any free number, the server's kind
    assert engine.started == [2, 7]
    # no name and nothing drained: the next free name
    added, message, started = devices.add()
    assert (added, started, engine.started) == (["worker-8"], True, [2, 7, 8])
    assert "worker-8 is up" in message


def test_adding_refuses_what_it_cannot_do_and_says_what_to_do() -> None:
    devices, engine = fleet(memory_available=lambda: 16 << 30)
    cases = [
        ({"device": "worker-1"}, 409, "worker-1 is in this deployment already, and not drained: nothing to add "
                                      r"\(a new device needs a new name; the next free one is worker-2\)"),
        ({"device": "worker-01"}, 409, "worker-01 is in this deployment already"),
        ({"device": "gpu-3"}, 400, r"devices are named worker-N \(the next free one is worker-2\)"),
        ({"device": "worker-2", "kind": "cuda"}, 400, "cannot start a device of kind 'cuda': its workers are cpu"),
    ]
    for kwargs, status, says in cases:
        with pytest.raises(DeviceRefused, match=says) as refused:
            devices.add(**kwargs)
        assert refused.value.status == status, kwargs
    assert engine.started == []
    engine.worker_info[1].alive = False
    with pytest.raises(DeviceRefused, match="worker-1 is dead; its name stays taken"):
        devices.add("worker-1")


def test_a_drained_device_comes_back_without_a_new_worker() -> None:
    devices, engine = fleet(memory_available=lambda: 16 << 30)
    devices.drained.add("worker-1")
    assert devices.available() == ["worker-0"]
    added, message, started = devices.add()  # the first drained one
    assert (added, started, engine.started) == (["worker-1"], False, [])
    assert "worker-1 is available again" in message and devices.available() == ["worker-0", "worker-1"]


def test_the_server_limit_and_the_host_memory_are_respected() -> None:
    devices, engine = fleet(max_devices=2, memory_available=lambda: 16 << 30)
    with pytest.raises(DeviceRefused, match=r"holds 2 devices \(worker-0, worker-1\), its limit \(--max-devices 2\)") \
            as refused:
        devices.add("worker-2")
    assert refused.value.status == 409
    engine.worker_info[1].alive = False  # a dead worker holds no place
    assert devices.add("worker-2")[0] == ["worker-2"]

    # the model (30 x 18 + 2 x 110 = 760 MiB) plus its KV cap (64 MiB), below the 4 GiB budget
    devices, engine = fleet(memory_available=lambda: 800 << 20)
    with pytest.raises(DeviceRefused, match="has 800 MiB of memory available and worker-2 may need 824 MiB") as refused:
        devices.add("worker-2")
    assert refused.value.status == 409 and engine.started == []
    devices.memory_available = lambda: 824 << 20
    assert devices.add("worker-2")[2]


# ---- a target whose stages name no device never lands on a drained one ----------------------

class PlanningReconfig(Reconfigurations):
    """Reconfigurations.plan over FakeEngine's workers, serving `current`, with no request running."""

    def __init__(self, engine: FakeEngine, current: Configuration):
        engine.arch = SimpleNamespace(n_layers=30)
        engine.epoch = 1
        engine.config.max_overhead = 0.05
        super().__init__(engine)
        self._current = current

    def current(self) -> Configuration:
        return self._current

    def footprint(self) -> ModelFootprint:
        return ModelFootprint(30, 18 << 20, 110 << 20, 110 << 20, 1536, 16)

    def requests(self) -> list:
        return []


def test_stages_without_devices_are_placed_on_available_devices_only() -> None:
    engine = FakeEngine(4)
    reconfig = PlanningReconfig(engine, config("worker-0:0-10,worker-1:10-20,worker-3:20-30"))
    drained = {"worker-2"}  # worker-2 is a spare, but drained
    target = Configuration.from_stages_text("0:8,8:16,16:24,24:30")  # a 4th stage: no device left for it
    with pytest.raises(ConfigurationError, match=r"4 stages and there are 3 devices.*\(worker-2 drained: "
                                                 r"`pipeshift device add` makes a device available again\)"):
        reconfig.plan(target, exclude=drained)
    plan = reconfig.plan(Configuration.from_stages_text("0:15,15:30"), exclude=drained)
    assert "worker-2" not in plan.target.devices()
    assert "worker-2" in reconfig.plan(target).target.devices()  # nothing excluded: the spare takes a stage
    # a device that serves now (its drain under way) stays in the plan's view: the source of its layers
    plan = reconfig.plan(config("worker-0:0-15,worker-1:15-30"), exclude={"worker-3"})
    assert plan.feasible and plan.target.devices() == ["worker-0", "worker-1"]


def test_a_deployment_down_says_to_restart_the_server() -> None:
    from agent.reconfigurations import ApplyRefused

    engine = FakeEngine(3)
    reconfig = PlanningReconfig(engine, config("worker-0:0-15,worker-1:15-30"))
    engine.failure = "pipeline 1 stage 1 (worker 1, layers 15-29) died (exit code -9)"
    says = r"the deployment is down: pipeline 1 .* not replaced live: restart `pipeshift serve`"
    with pytest.raises(ApplyRefused, match=says) as refused:  # a dry run too, not a plan it cannot apply
        reconfig.plan(Configuration.from_stages_text("0:30"))
    assert refused.value.status == 503
    devices = DeviceFleet(reconfig, memory_available=lambda: 16 << 30)
    with pytest.raises(DeviceRefused, match=says) as refused:
        devices.add("worker-3")
    assert refused.value.status == 503 and engine.started == []
