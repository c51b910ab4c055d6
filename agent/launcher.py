"""Starts the worker processes. Local mode runs them on this machine.

The engine only uses the `Launcher` interface, so a cluster backend (Ray actors placed one per
GPU) can replace `LocalLauncher` without anything above it knowing.
"""

from __future__ import annotations

import multiprocessing
import os
from typing import Protocol

FORK_SERVER_PRELOAD = ["agent.worker_preload"]


def start_fork_server(threads_per_worker: int = 1) -> None:
    """Starts the fork server that `LocalLauncher` forks workers from, without waiting for it:
    it imports torch and warms up (seconds) while this process goes on importing and starting
    the rest, instead of after. `LocalLauncher` uses it as it is, or starts it if not yet."""
    from multiprocessing import forkserver

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(FORK_SERVER_PRELOAD)
    # OpenMP reads it when the fork server imports torch; only the fork server is given it
    # here (`LocalLauncher.start` sets it for this process as before).
    unset = "OMP_NUM_THREADS" not in os.environ
    if unset:
        os.environ["OMP_NUM_THREADS"] = str(threads_per_worker)
    try:
        forkserver.ensure_running()
    finally:
        if unset:
            del os.environ["OMP_NUM_THREADS"]


class Launcher(Protocol):
    def start(self, n_workers: int, control_address: str) -> None: ...

    def launch(self, worker_id: int) -> None:
        """Starts one more worker (`pipeshift device add`), after `start`."""
        ...

    def exit_codes(self) -> dict[int, int | None]:
        """Returns each worker's exit code (negative: killed by that signal), None while it runs."""
        ...

    def pid(self, worker_id: int) -> int: ...

    def kill(self, worker_id: int) -> None: ...

    def stop(self, timeout_s: float = 5.0) -> None: ...


class LocalLauncher:
    """One OS process per device on this machine (CPU workers, or one GPU each).

    Workers are forked from a fork server that has already imported torch and the engine's
    modules: each starts in a fraction of a second, and the ~200 MiB of pages that importing
    torch writes stay shared between workers (copy-on-write) instead of being private to each.
    """

    def __init__(self, threads_per_worker: int = 1, devices: list[str] | None = None):
        self.threads_per_worker = threads_per_worker
        self.devices = devices
        self.processes: dict[int, multiprocessing.Process] = {}

    def start(self, n_workers: int, control_address: str) -> None:
        # Read by OpenMP when the fork server imports torch; set before it starts.
        os.environ.setdefault("OMP_NUM_THREADS", str(self.threads_per_worker))
        self.control_address = control_address
        for worker_id in range(n_workers):
            self.launch(worker_id)

    def launch(self, worker_id: int) -> None:
        """Starts worker `worker_id`, forked from the same fork server as the others."""
        if self.devices and worker_id >= len(self.devices):
            raise ValueError(f"no device for worker {worker_id}: this launcher was given {len(self.devices)}")
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(FORK_SERVER_PRELOAD)
        device = self.devices[worker_id] if self.devices else "cpu"
        argv = [
            "--control", self.control_address,
            "--worker-id", str(worker_id),
            "--threads", str(self.threads_per_worker),
            "--device", device,
        ]
        from agent.worker import main as worker_main  # torch: imported by whoever launches

        process = ctx.Process(target=worker_main, args=(argv,), name=f"pipeshift-worker-{worker_id}", daemon=True)
        process.start()
        self.processes[worker_id] = process

    def exit_codes(self) -> dict[int, int | None]:
        # a copy first: `launch` may add a worker while the engine's monitor reads these
        return {wid: p.exitcode for wid, p in list(self.processes.items())}

    def pid(self, worker_id: int) -> int:
        return self.processes[worker_id].pid

    def kill(self, worker_id: int) -> None:
        self.processes[worker_id].kill()

    def stop(self, timeout_s: float = 5.0) -> None:
        for p in self.processes.values():
            if p.exitcode is None:
                p.terminate()
        for p in self.processes.values():
            p.join(timeout_s)
            if p.exitcode is None:
                p.kill()
                p.join()
