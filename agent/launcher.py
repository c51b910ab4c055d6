"""Starts the worker processes. Local mode runs them on this machine as subprocesses.

The engine only uses the `Launcher` interface, so a cluster backend (Ray actors placed one per
GPU) can replace `LocalLauncher` without anything above it knowing.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Protocol


class Launcher(Protocol):
    def start(self, n_workers: int, control_address: str) -> None: ...

    def exit_codes(self) -> dict[int, int | None]:
        """Returns each worker's exit code, None while it runs."""
        ...

    def kill(self, worker_id: int) -> None: ...

    def stop(self, timeout_s: float = 5.0) -> None: ...


class LocalLauncher:
    """One OS process per device on this machine (CPU workers, or one GPU each)."""

    def __init__(self, threads_per_worker: int = 1, devices: list[str] | None = None):
        self.threads_per_worker = threads_per_worker
        self.devices = devices
        self.processes: dict[int, subprocess.Popen] = {}

    def start(self, n_workers: int, control_address: str) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads_per_worker)}
        for worker_id in range(n_workers):
            device = self.devices[worker_id] if self.devices else "cpu"
            self.processes[worker_id] = subprocess.Popen(
                [
                    sys.executable, "-m", "agent.worker",
                    "--control", control_address,
                    "--worker-id", str(worker_id),
                    "--threads", str(self.threads_per_worker),
                    "--device", device,
                ],
                env=env,
            )

    def exit_codes(self) -> dict[int, int | None]:
        return {wid: p.poll() for wid, p in self.processes.items()}

    def pid(self, worker_id: int) -> int:
        return self.processes[worker_id].pid

    def kill(self, worker_id: int) -> None:
        self.processes[worker_id].kill()

    def stop(self, timeout_s: float = 5.0) -> None:
        for p in self.processes.values():
            if p.poll() is None:
                p.terminate()
        for p in self.processes.values():
            try:
                p.wait(timeout_s)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
