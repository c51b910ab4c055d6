"""Devices joining and leaving a serving deployment: drain one live, re-admit it later.

    fleet = DeviceFleet(reconfig)
    fleet.drain("worker-2")   # plans the configuration without it and applies it live
    fleet.add("worker-2")     # makes it available to the planner (and the controller) again

Draining plans the least movement that frees the device (`drain_target`): a spare device
takes over its stage as it is; without a spare its layers join the neighbouring stage of its
pipeline; a pipeline of that device alone is dropped while others serve. The apply goes
through the same path as the admin API's (agent/reconfigurations.py), so it never runs beside
another. Once the apply has switched, the device holds nothing and is marked `drained`: the
controller and admin targets leave it alone until it is added back.

In local mode the engine starts its worker processes once, so `add` re-admits a drained
device; it does not start a new worker process.
"""

from __future__ import annotations

import threading
from typing import Any

from planner.configuration import Configuration, PipelineConfig, StageConfig


class DeviceRefused(Exception):
    """A drain or add that cannot be done; `status` is the HTTP answer (404, 409, 503)."""

    def __init__(self, message: str, status: int = 409):
        super().__init__(message)
        self.message, self.status = message, status


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
    def __init__(self, reconfig: Any):
        self.reconfig = reconfig
        self.drained: set[str] = set()
        self._draining: dict[str, Any] = {}  # device -> ApplyRecord of its drain
        self._lock = threading.Lock()

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

    def _known(self, device: str) -> None:
        engine = self.reconfig.engine
        names = {info.name: info for info in engine.worker_info.values()}
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
                record = self.reconfig.start(target)
            except ApplyRefused as exc:
                raise DeviceRefused(f"cannot drain {device}: {exc.message}", exc.status) from None
            self._draining[device] = record
            return record, f"draining {device}: apply {record.apply_id} moves it to {target.describe()}"

    def add(self, device: str | None = None) -> tuple[list[str], str]:
        """Makes a drained device available again (the first drained one when None); returns
        (the devices added, what was done)."""
        if device is not None:
            self._known(device)
        with self._lock:
            self._settle()
            if device is not None and device in self._draining:
                raise DeviceRefused(f"{device} is being drained by apply {self._draining[device].apply_id}: "
                                    "wait for it to end, then add it")
            wanted = [device] if device is not None else sorted(self.drained)[:1]
            added = [d for d in wanted if d in self.drained]
            self.drained.difference_update(added)
        if added:
            return added, (f"{added[0]} is available again; the planner and the controller may place layers "
                           "on it (local mode re-admits drained workers; it starts no new worker process)")
        return [], ((f"{device} is available already" if device else "no drained device to re-admit")
                    + "; local mode starts no new worker process while serving")
