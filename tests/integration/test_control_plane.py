"""Terraform's contract against a real `pipeshift serve` and a real store (a PostgreSQL server
the run starts; the same store code on SQLite is tested live by test_planner_api.py and
test_device_drain_live.py, and both databases by tests/store): init -> plan -out -> apply PLANFILE -> history -> plan
again says "No changes." -> rollback -> history shows both -> a stale saved plan is refused ->
a concurrent apply is refused by the lock -> a killed apply leaves an "interrupted" row and
its lock, which force-unlock frees (the refusal says its holder is no longer running) -> the next
plan fills that row from the server, which finished the apply.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.serve_process import ServeProcess
from planner.store import open_store

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
SPEC = str(ROOT / "data" / "specs" / "local-cpu-smollm2.yaml")  # 4 full replicas on 4 workers


def _wait_for(condition, timeout_s: float = 120.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise TimeoutError(f"waited {timeout_s} s for {what}")


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_plan_apply_history_stale_lock_and_interrupted(database_url, tmp_path):
    env = {**os.environ, "PIPESHIFT_DATABASE_URL": database_url}

    def pipeshift(*args: str, check: int | None = 0) -> subprocess.CompletedProcess:
        done = subprocess.run([sys.executable, "-m", "planner.cli", *args], capture_output=True, text=True,
                              timeout=300, cwd=tmp_path, env=env)
        if check is not None:
            assert done.returncode == check, f"{args}: {done.stdout}\n{done.stderr}"
        return done

    def start(*args: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "planner.cli", *args], cwd=tmp_path, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    assert "Created the store" in pipeshift("init").stdout
    with ServeProcess("--devices", "4", "--stages", "0:30") as server:
        url = server.base_url
        planned = pipeshift("plan", "-f", SPEC, "--server", url, "-out", "p1.json", "--detailed-exitcode", check=2)
        assert "+ pipeline 1" in planned.stdout and "Saved the plan to: p1.json" in planned.stdout

        applied = pipeshift("apply", "p1.json")
        assert "Apply complete: epoch 2 serves." in applied.stdout

        history = pipeshift("history").stdout
        assert "observed" in history and "applied" in history and "apply " in history
        store = open_store(database_url)
        try:
            configs = store.configurations()
            assert [(c.serial, c.source, len(c.pipelines)) for c in configs] == [(1, "observed", 1), (2, "apply", 4)]
            (row,) = store.applies()
            assert (row.state, row.outcome, row.to_id, row.from_id) == ("done", "applied", configs[1].id, configs[0].id)
            assert row.bytes_moved > 0 and row.plan_id is not None
        finally:
            store.close()

        again = pipeshift("plan", "-f", SPEC, "--server", url, "--detailed-exitcode", check=0)
        assert "No changes." in again.stdout

        back = pipeshift("rollback", str(configs[0].id), "--server", url, "--auto-approve")
        assert "Apply complete: epoch 3 serves." in back.stdout
        history = pipeshift("history").stdout
        assert "rollback" in history and history.count("applied") == 2

        stale = pipeshift("apply", "p1.json", check=1)  # made against serial 1; serial 3 serves
        assert "Saved plan is stale" in stale.stderr

        pipeshift("plan", "-f", SPEC, "--server", url, "-out", "p2.json")

        # A second apply while one holds the lock is refused, and says by whom.
        first = start("apply", "p2.json")
        store = open_store(database_url)
        try:
            _wait_for(lambda: store.locks(), what="the first apply's lock")
            refused = pipeshift("apply", "--server", url, "--stages", "0:15,15:30", "--auto-approve", check=1)
            assert "the deployment is locked: held by" in refused.stderr and "force-unlock" in refused.stderr
            out, err = first.communicate(timeout=300)
            assert first.returncode == 0, out + err
            assert not store.locks()

            # A killed apply: its row says interrupted, its lock stays until force-unlock.
            pipeshift("apply", "--server", url, "--stages", "0:30", "--auto-approve")
            killed = start("apply", "--server", url, "-f", SPEC, "--auto-approve")
            _wait_for(lambda: any(a.server_apply_id and a.state == "running" for a in store.applies()),
                      what="the apply to start on the server")
            killed.send_signal(signal.SIGKILL)
            killed.wait(30)
            interrupted = [a for a in store.applies() if a.state == "interrupted"]
            assert len(interrupted) == 1 and "ended before the apply did" in interrupted[0].error
            assert "interrupted" in pipeshift("history").stdout
            (lock,) = store.locks()
            locked = pipeshift("apply", "--server", url, "--stages", "0:30", "--auto-approve", check=1)
            assert f"pipeshift force-unlock {lock.id}" in locked.stderr
            assert f"(pid {killed.pid}) is no longer running on this host" in locked.stderr
            assert "Released lock" in pipeshift("force-unlock", lock.id).stdout
            # The server finished the apply on its own: the next plan fills the row from its record.
            _wait_for(lambda: not any(a["state"] == "running" for a in _applies(url)), what="the server's apply")
            filled = pipeshift("plan", "-f", SPEC, "--server", url)
            assert f"Note: apply {interrupted[0].id}, interrupted" in filled.stdout, filled.stdout
            assert "filled from the server" in filled.stdout and "No changes." in filled.stdout
            assert "Note: the deployment serves epoch" not in filled.stdout  # recorded, not drift
            row = store.apply(interrupted[0].id)
            assert (row.state, row.outcome, row.to_id) == ("done", "applied", store.current().id)
            assert row.bytes_moved > 0 and any(p["state"] == "done" for p in row.phases)
            assert store.current().source == "apply"
            assert "filled from the server's record" in pipeshift("history").stdout
        finally:
            store.close()


def _applies(url: str) -> list[dict]:
    from planner.admin_client import AdminClient

    return AdminClient(url)._request("GET", "/admin/v1/applies")["data"]
