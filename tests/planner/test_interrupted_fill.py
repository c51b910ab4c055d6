"""A `pipeshift apply` killed mid-apply leaves an `interrupted` row that names the server's apply;
the server goes on and finishes it. The next refresh from the server fills that row from the
server's record (outcome, phases, figures, the configuration it produced) and says so; one the
server no longer knows stays interrupted. A real store (SQLite, and PostgreSQL when installed);
the admin API is answered by canned replies (the live server is
tests/integration/test_control_plane.py's)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from planner.admin_client import AdminClient, AdminError
from planner.cli import main
from planner.deployment_state import refresh
from planner.operations import ApplyRun, OperationError
from planner.store import init_schema, open_store
from planner.store.records import Store
from tests.planner.test_plan_against_server import SPEC  # two CPU devices, SmolLM2

TWO = [{"stages": [{"device": "worker-0", "start": 0, "end": 15}, {"device": "worker-1", "start": 15, "end": 30}]}]
ONE = [{"stages": [{"device": "worker-0", "start": 0, "end": 30}]}]
PHASES = [{"name": n, "state": "done", "started_at": 100.0 + i, "ended_at": 101.0 + i, "bytes": 10}
          for i, n in enumerate(("prepare", "prefetch", "precopy", "switch", "cleanup"))]
SERVING = {"before": {"ttft_ms": 10.0}, "during": {"ttft_ms": 12.0}, "after": {"ttft_ms": 10.5}, "streams": []}


def deployment(pipelines: list[Any], epoch: int) -> dict[str, Any]:
    return {"model": "SmolLM2-135M", "epoch": epoch, "configuration": {"pipelines": pipelines},
            "devices": [{"name": "worker-0", "kind": "cpu", "state": "serving"},
                        {"name": "worker-1", "kind": "cpu", "state": "serving"}]}


def server_record(apply_id: str, outcome: str | None, state: str = "done", error: str | None = None) -> dict[str, Any]:
    return {"id": apply_id, "state": state, "outcome": outcome, "error": error, "epoch_from": 1, "epoch_to": 2,
            "created_at": time.time() - 5, "finished_at": time.time() - 1 if state == "done" else None,
            "phases": PHASES, "measured": {"bytes_moved": 4096, "stall_ms": 7.5},
            "predicted": {"stall_ms": 6.0, "bytes_moved": 4000}, "target": {"pipelines": ONE}}


class CannedServer(AdminClient):
    """The admin API as a server that went on with the apply after its client was killed."""

    def __init__(self, serving: list[Any], epoch: int, applies: list[dict[str, Any]]):
        super().__init__("http://127.0.0.1:8765")
        self.served, self.epoch, self.records = serving, epoch, applies
        self.asked: list[str] = []

    def deployment(self) -> dict[str, Any]:
        return deployment(self.served, self.epoch)

    def applies(self) -> list[dict[str, Any]]:
        self.asked.append("applies")
        return self.records

    def get_apply(self, apply_id: str) -> dict[str, Any]:
        for r in self.records:
            if r["id"] == apply_id:
                return r
        raise AdminError(f"no apply {apply_id!r}; GET /admin/v1/applies lists them", 404)

    def serving(self, apply_id: str) -> dict[str, Any]:
        self.get_apply(apply_id)
        return SERVING

    def plan(self, target: dict[str, Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
        return {"plan": {"has_changes": True, "target": target}, "text": "  ~ pipeline 0 ...", "feasible": True}


@pytest.fixture
def store(database_url: str):
    """A real store: a SQLite file, and a database on a PostgreSQL server when one is installed."""
    init_schema(database_url)
    s = open_store(database_url)
    yield s
    s.close()


def dead_holder() -> str:
    """Returns `host:pid` of a process of this host that has ended."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return f"{socket.gethostname()}:{child.pid}"


def killed_apply(store: Store, server_apply_id: str | None = "apply-1-abc123") -> tuple[str, int, str]:
    """Writes what a `pipeshift apply` killed mid-apply leaves: the record, its running row naming
    the server's apply, and its lock. Returns the row's id, the starting configuration's and the lock's."""
    start = store.record_configuration("SmolLM2-135M", TWO, "observed", epoch=1)
    row = store.begin_apply(None, start.id)
    holder = dead_holder()
    lock = store.lock("deployment at http://127.0.0.1:8765", "pipeshift apply", holder=holder)
    store.update_apply(row.id, holder=holder, server_apply_id=server_apply_id,
                       phases=[{"name": "prefetch", "state": "running"}], bytes_moved=100)
    return row.id, start.id, lock.id


def test_an_apply_the_server_finished_is_filled_on_the_next_refresh(store: Store) -> None:
    row_id, start_id, lock_id = killed_apply(store)
    assert store.apply(row_id).state == "interrupted"  # history, before any refresh
    server = CannedServer(ONE, 2, [server_record("apply-1-abc123", "applied")])

    refreshed = refresh(store, server.deployment(), server)

    row = store.apply(row_id)
    assert (row.state, row.outcome) == ("done", "applied")
    assert row.phases == PHASES and row.bytes_moved == 4096 and row.stall_ms == 7.5 and row.serving == SERVING
    assert "filled from the server's record of apply apply-1-abc123" in row.note
    assert row.error is None  # it applied: no error to report
    assert row.finished_at is not None
    configs = store.configurations()
    assert [(c.serial, c.source, c.epoch) for c in configs] == [(1, "observed", 1), (2, "apply", 2)]
    assert row.to_id == configs[1].id and row.from_id == start_id and configs[1].pipelines == ONE
    assert configs[1].predicted == {"stall_ms": 6.0, "bytes_moved": 4000}
    # what it produced is what serves: no drift, and the refresh says what it filled
    assert refreshed.drift is None and refreshed.current.id == configs[1].id
    (line,) = refreshed.filled
    assert f"apply {row_id}" in line and "filled from the server" in line and "applied" in line
    # the killed process's lock stays until force-unlock, as Terraform keeps it
    assert [lock.id for lock in store.locks()] == [lock_id]
    # a second refresh changes nothing
    again = refresh(store, server.deployment(), server)
    assert again.filled == [] and again.drift is None and len(store.configurations()) == 2
    history = [e for e in store.history() if e["type"] == "apply"]
    assert history[0]["outcome"] == "applied" and history[0]["to"] == configs[1].id


@pytest.mark.parametrize("outcome", ["aborted", "failed"])
def test_an_apply_the_server_did_not_carry_out_is_filled_without_a_configuration(store: Store, outcome: str) -> None:
    row_id, _, _ = killed_apply(store)
    server = CannedServer(TWO, 1, [server_record("apply-1-abc123", outcome, error="cancelled before the switch")])

    refreshed = refresh(store, server.deployment(), server)

    row = store.apply(row_id)
    assert (row.state, row.outcome, row.to_id) == ("done", outcome, None)
    assert row.error == "cancelled before the switch" and "filled from the server" in row.note
    assert [c.serial for c in store.configurations()] == [1] and refreshed.drift is None
    assert len(refreshed.filled) == 1 and outcome in refreshed.filled[0]


def test_an_apply_the_server_no_longer_knows_stays_interrupted(store: Store) -> None:
    row_id, _, _ = killed_apply(store)
    # the server restarted: it knows none of the applies before, and serves its starting configuration
    server = CannedServer(TWO, 1, [server_record("apply-1-fff000", "applied")])

    refreshed = refresh(store, server.deployment(), server)

    row = store.apply(row_id)
    assert row.state == "interrupted" and "ended before the apply did" in row.error and row.outcome is None
    assert refreshed.filled == [] and [c.serial for c in store.configurations()] == [1]


def test_an_apply_still_running_on_the_server_is_filled_once_it_ends(store: Store) -> None:
    row_id, _, _ = killed_apply(store)
    server = CannedServer(TWO, 1, [server_record("apply-1-abc123", None, state="running")])
    assert refresh(store, server.deployment(), server).filled == []
    assert store.apply(row_id).state == "interrupted"

    server.records, server.served, server.epoch = [server_record("apply-1-abc123", "applied")], ONE, 2
    assert len(refresh(store, server.deployment(), server).filled) == 1
    assert (store.apply(row_id).outcome, store.current().source) == ("applied", "apply")


def test_a_configuration_a_refresh_recorded_already_is_linked_not_recorded_twice(store: Store) -> None:
    row_id, _, _ = killed_apply(store)
    server = CannedServer(ONE, 2, [server_record("apply-1-abc123", "applied")])
    observed = refresh(store, server.deployment()).current  # a refresh without the server's applies: drift
    assert (observed.serial, observed.source) == (2, "observed")

    refreshed = refresh(store, server.deployment(), server)

    assert store.apply(row_id).to_id == observed.id and len(store.configurations()) == 2
    assert refreshed.drift is None and len(refreshed.filled) == 1


def test_a_record_that_moved_on_without_the_configuration_is_not_rewritten(store: Store) -> None:
    """Something else changed the deployment after the killed apply, and a refresh recorded that
    (epoch 3): the apply's own configuration (epoch 2) cannot be slotted in before it."""
    row_id, _, _ = killed_apply(store)
    later = refresh(store, deployment([{"stages": [{"device": "worker-1", "start": 0, "end": 30}]}], 3))
    server = CannedServer(later.current.pipelines, 3, [server_record("apply-1-abc123", "applied")])

    refreshed = refresh(store, server.deployment(), server)

    row = store.apply(row_id)
    assert (row.state, row.outcome, row.to_id) == ("done", "applied", None)
    assert "the store recorded serial 2 since" in row.note and "(epoch 2) is not recorded" in row.note
    assert [c.serial for c in store.configurations()] == [1, 2] and refreshed.current.id == later.current.id


def test_an_apply_without_the_servers_id_and_a_live_one_are_left_alone(store: Store) -> None:
    row_id, start_id, _ = killed_apply(store, server_apply_id=None)  # killed before the server answered
    live = store.begin_apply(None, start_id)  # this process: still running
    store.update_apply(live.id, server_apply_id="apply-2-live00")
    server = CannedServer(TWO, 1, [server_record("apply-2-live00", "applied")])
    assert refresh(store, server.deployment(), server).filled == []
    assert store.apply(row_id).state == "interrupted" and store.apply(live.id).state == "running"
    assert server.asked == []  # no interrupted row names a server apply: nothing to ask


def test_nothing_interrupted_asks_the_server_nothing(store: Store) -> None:
    store.record_configuration("SmolLM2-135M", TWO, "observed", epoch=1)
    server = CannedServer(TWO, 1, [])
    refresh(store, server.deployment(), server)
    assert server.asked == []


def test_a_server_that_cannot_list_its_applies_leaves_the_row_for_later(store: Store, monkeypatch) -> None:
    row_id, _, _ = killed_apply(store)
    server = CannedServer(TWO, 1, [])

    def refuse(self: AdminClient) -> list[dict[str, Any]]:
        raise AdminError("HTTP 500", 500)

    monkeypatch.setattr(CannedServer, "applies", refuse)
    assert refresh(store, server.deployment(), server).filled == []
    assert store.apply(row_id).state == "interrupted"


def test_apply_after_force_unlock_fills_the_row_before_it_plans(store: Store) -> None:
    row_id, _, lock_id = killed_apply(store)
    server = CannedServer(ONE, 2, [server_record("apply-1-abc123", "applied")])
    run = ApplyRun(store, server)
    with pytest.raises(OperationError) as refused:  # the killed apply's lock still holds
        run.prepare(target=lambda d: {"target": {"pipelines": TWO}})
    assert refused.value.status == 409 and f"pipeshift force-unlock {lock_id}" in str(refused.value)
    assert store.apply(row_id).state == "interrupted"  # nothing refreshed without the lock
    store.force_unlock(lock_id)
    run.prepare(target=lambda d: {"target": {"pipelines": TWO}})
    try:
        assert run.drift is None and len(run.filled) == 1 and store.apply(row_id).outcome == "applied"
    finally:
        run.close()


def test_plan_says_it_filled_the_row_and_history_shows_the_outcome(capsys, tmp_path: Path, monkeypatch) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    assert main(["init", "--database-url", url]) == 0
    s = open_store(url)
    try:
        row_id, _, _ = killed_apply(s)
    finally:
        s.close()
    server = CannedServer(ONE, 2, [server_record("apply-1-abc123", "applied")])
    for name in ("deployment", "applies", "serving", "plan"):
        monkeypatch.setattr(AdminClient, name, getattr(CannedServer, name).__get__(server))
    capsys.readouterr()
    assert main(["history", "--database-url", url]) == 0
    assert f"apply {row_id:<19} apply      interrupted" in capsys.readouterr().out

    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC)
    code = main(["plan", "-f", str(spec), "--server", "127.0.0.1:8765", "--database-url", url])
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"Note: apply {row_id}, interrupted when its process" in out and "filled from the server" in out
    assert "Note: the deployment serves epoch" not in out  # what it produced is recorded, not drift

    assert main(["history", "--database-url", url]) == 0
    history = capsys.readouterr().out
    assert f"apply {row_id:<19} apply      applied" in history and "filled from the server's record" in history
    assert "interrupted " not in history.replace("ended before", "")
