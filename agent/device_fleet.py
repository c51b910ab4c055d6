"""Devices joining and leaving a serving deployment: drain one live, add one (new or back).

    fleet = DeviceFleet(reconfig)
    fleet.drain("worker-2")   # plans the configuration without it and applies it live
    fleet.add("worker-2")     # a drained device: available to the planner (and the controller) again
    fleet.add("worker-3")     # a new device: starts its worker process, a spare holding no layers

Draining plans the least movement that frees the device (`drain_target`): a spare device
takes over its stage as it is; without a spare its layers join the neighbouring stage of its
pipeline; a pipeline of that device alone is dropped while others serve. The apply goes
through the same path as the admin API's (agent/reconfigurations.py), so it never runs beside
another. Once the apply has switched, the device holds nothing and is marked `drained`: the
controller and admin targets leave it alone until it is added back.

Adding a name the deployment does not have yet starts one more worker process the way the
engine starts its workers (`PipelineEngine.add_worker`): named as they are (worker-N), of the
server's kind, with their KV cap and memory budget. It returns once the worker answers; the
worker then serves nothing until an apply (the controller's, `pipeshift apply`, or
`POST /admin/v1/applies`) places layers on it. Refusals say what to do: a name taken (409), a
name outside the worker-N scheme or a kind this server cannot start (400), a server at its
`max_devices` (409), a host whose available memory cannot hold what the new worker may load,
the whole model plus its KV cap or its memory budget when that is smaller (409).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from planner.configuration import Configuration, PipelineConfig, StageConfig


class DeviceRefused(Exception):
    """A drain or add that cannot be done; `status` is the HTTP answer (400, 404, 409, 503)
    and `code` the error's code."""

    def __init__(self, message: str, status: int = 409, code: str | None = None):
        super().__init__(message)
        self.message, self.status = message, status
        self.code = code or {400: "invalid_device", 404: "not_found", 503: "unavailable"}.get(status, "device_refused")


def host_memory_available_bytes() -> int | None:
    """Returns what this host's kernel says is available (MemAvailable), None when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def drain_target(current: Configuration, device: str, spares: list[str]) -> Configuration:
    """Returns `current` without `device`: a spare takes its stage, else its layers join the
    previous stage of its pipeline (the next one for a first stage), else its single-stage
    pipeline goes. Raises DeviceRefused when it is the only device serving."""
    pipelines: list[PipelineConfig] = []
    for p in current.pipelines:
        if device not in p.devices:
            pipelines.append(p)
            continue
        stages = list(p.stages)
        i = p.devices.index(device)
        gone = stages[i]
        if spares:
            stages[i] = StageConfig(spares[0], gone.start, gone.end)
        elif len(stages) > 1:
            j = i - 1 if i > 0 else 1
            neighbour = stages[j]
            stages[j] = StageConfig(neighbour.device, min(gone.start, neighbour.start), max(gone.end, neighbour.end))
            del stages[i]
        else:
            continue  # a pipeline of this device alone: the others carry on
        pipelines.append(PipelineConfig(tuple(stages)))
    if not pipelines:
        raise DeviceRefused(f"{device} is the only device serving: add a device before draining it")
    return Configuration(tuple(pipelines))


class DeviceFleet:
    def __init__(self, reconfig: Any, max_devices: int | None = None,
                 memory_available: Callable[[], int | None] = host_memory_available_bytes):
        self.reconfig = reconfig
        self.max_devices = max_devices  # workers alive at most (None: no limit)
        self.memory_available = memory_available
        self.drained: set[str] = set()
        self._draining: dict[str, Any] = {}  # device -> ApplyRecord of its drain
        self._lock = threading.Lock()
        self._adding = threading.Lock()  # one new worker at a time (the engine takes the next to connect)

    def _settle(self) -> None:
        """Turns finished drains into `drained` (applied) or back to available (not applied)."""
        for name, record in list(self._draining.items()):
            if record.done.is_set():
                del self._draining[name]
                if record.outcome == "applied":
                    self.drained.add(name)

    def state(self, device: str) -> str | None:
        """Returns "drained", "draining" or None (available as the deployment says)."""
        with self._lock:
            self._settle()
            if device in self._draining:
                return "draining"
            return "drained" if device in self.drained else None

    def unavailable(self) -> set[str]:
        """Returns the devices neither the controller nor an admin target may use."""
        with self._lock:
            self._settle()
            return self.drained | set(self._draining)

    def available(self) -> list[str]:
        """Returns the live devices the planner may use, in worker order."""
        out = self.unavailable()
        return [d.name for d in self.reconfig.devices() if d.name not in out]

    def _workers(self) -> dict[str, Any]:
        """Returns the engine's workers by name (dead ones too)."""
        return {info.name: info for info in list(self.reconfig.engine.worker_info.values())}

    def _known(self, device: str) -> None:
        names = self._workers()
        if device not in names:
            raise DeviceRefused(f"no device {device!r}: this deployment's devices are {', '.join(sorted(names))}",
                                status=404)
        if not names[device].alive:
            raise DeviceRefused(f"{device} is dead: it holds nothing to drain")

    def drain(self, device: str) -> tuple[Any, str]:
        """Starts moving `device`'s layers elsewhere; returns (the apply's record or None, what
        was done). Raises DeviceRefused, or what the apply path raises (ApplyRefused)."""
        from agent.reconfigurations import ApplyRefused

        self._known(device)
        with self._lock:
            self._settle()
            if device in self._draining:
                record = self._draining[device]
                return record, f"{device} is being drained by apply {record.apply_id}"
            if device in self.drained:
                return None, f"{device} is drained already"
            current = self.reconfig.current()
            if device not in current.devices():
                self.drained.add(device)
                return None, f"{device} held no stage; it is drained"
            spares = [d.name for d in self.reconfig.devices()
                      if d.name not in current.devices() and d.name not in self.drained and d.name != device]
            target = drain_target(current, device, spares)
            try:
                # a drain must happen: requests whose KV does not fit recompute it (as evicted)
                record = self.reconfig.start(target, recompute_overflow=True)
            except ApplyRefused as exc:
                raise DeviceRefused(f"cannot drain {device}: {exc.message}", exc.status) from None
            self._draining[device] = record
            serving = "; ".join(p.describe() for p in target.pipelines)
            return record, (f"draining {device}: apply {record.apply_id} moves its layers off it; "
                            f"then serving: {serving}")

    def kind(self) -> str:
        """Returns the kind of device this server's workers are (and new ones would be)."""
        device = self.reconfig.engine.config.device
        return "cpu" if device == "cpu" else device

    def add(self, device: str | None = None, kind: str | None = None) -> tuple[list[str], str, bool]:
        """Adds `device`: a drained one is made available again; a name the deployment does not
        have starts a new worker under it. Without a name: the first drained device, or, with
        none drained, a new worker under the next free name (worker-N). Returns (the devices added, what was done, whether a worker
        process was started); raises DeviceRefused saying what to do."""
        if kind is not None and kind != self.kind():
            raise DeviceRefused(f"this server cannot start a device of kind {kind!r}: its workers are "
                                f"{self.kind()} workers (local mode starts them on this host); omit the kind "
                                f"or give {self.kind()!r}", status=400)
        names = self._workers()
        with self._lock:
            self._settle()
            if device is None and self.drained:
                device = sorted(self.drained)[0]
            if device is None:
                device = self._next_name()
            if device in names:
                return self._readmit(device, names[device])
        return self._start_worker(device)

    def _readmit(self, device: str, info: Any) -> tuple[list[str], str, bool]:
        """Under the lock: a drained device is available again; any other known one is refused."""
        if device in self._draining:
            raise DeviceRefused(f"{device} is being drained by apply {self._draining[device].apply_id}: "
                                "wait for it to end, then add it")
        if not info.alive:
            raise DeviceRefused(f"{device} is dead; its name stays taken: add a new device "
                                f"(the next free name is {self._next_name()})")
        if device not in self.drained:
            raise DeviceRefused(f"{device} is in this deployment already, and not drained: nothing to add "
                                f"(a new device needs a new name; the next free one is {self._next_name()})")
        self.drained.discard(device)
        return [device], f"{device} is available again; the planner and the controller may place layers on it", False

    def _next_name(self) -> str:
        from agent.engine import worker_name

        return worker_name(max(self.reconfig.engine.worker_info, default=-1) + 1)

    def _start_worker(self, device: str) -> tuple[list[str], str, bool]:
        """Starts a new worker process named `device`."""
        from agent.engine import worker_id_of, worker_name

        engine = self.reconfig.engine
        with self._adding:
            try:
                worker_id = worker_id_of(device)
            except ValueError:
                raise DeviceRefused(f"no device {device!r}, and a new one cannot have that name: this server's "
                                    f"devices are named worker-N (the next free one is {self._next_name()})",
                                    status=400) from None
            if worker_id in engine.worker_info:
                raise DeviceRefused(f"{device} is in this deployment already: nothing to add")
            if engine.failure:
                from agent.reconfigurations import down_message

                raise DeviceRefused(down_message(engine.failure), status=503)
            alive = [info.name for info in list(engine.worker_info.values()) if info.alive]
            if self.max_devices is not None and len(alive) >= self.max_devices:
                raise DeviceRefused(f"this server holds {len(alive)} devices ({', '.join(alive)}), its limit "
                                    f"(--max-devices {self.max_devices}): restart it with a larger --max-devices "
                                    "to add more")
            self._check_memory(device)
            try:
                info = engine.add_worker(worker_id)
            except (RuntimeError, ValueError) as exc:
                raise DeviceRefused(f"could not start {device}: {exc}", status=503) from None
        return [worker_name(info.worker_id)], (
            f"{device} is up (pid {engine.workers[info.worker_id].pid}), a spare holding no layers: an apply "
            "(`pipeshift apply`, POST /admin/v1/applies) or the controller may place layers on it"), True

    def _check_memory(self, device: str) -> None:
        """Refuses a new worker when the host's available memory cannot hold what it may load:
        the whole model and its KV cap, or its memory budget when that is smaller."""
        available = self.memory_available()
        if available is None:
            return
        engine, footprint = self.reconfig.engine, self.reconfig.footprint()
        model_bytes = footprint.weight_bytes(0, footprint.n_layers)
        needed = min(engine.memory_budget_bytes, model_bytes + engine.config.kv_cache_bytes)
        if available < needed:
            raise DeviceRefused(f"this host has {available / 2**20:.0f} MiB of memory available and {device} may "
                                f"need {needed / 2**20:.0f} MiB (the model's weights and its KV cap, or its memory "
                                "budget): free memory on the host, or restart the server with a smaller "
                                "--memory-budget or --kv-cache-mb")
