"""planner.store on SQLite and on a real PostgreSQL server: schema by Alembic, configurations
by lineage and serial, stale plans, locks, interrupted applies, history."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from planner.store import LockHeld, NoStore, StalePlan, UnknownId, init_schema, open_store
from planner.store.database import alembic_config
from planner.store.records import this_process

ROOT = Path(__file__).resolve().parents[2]
TWO_STAGES = [{"stages": [{"device": "worker-0", "start": 0, "end": 15}, {"device": "worker-1", "start": 15, "end": 30}]}]
THREE_STAGES = [{"stages": [{"device": "worker-0", "start": 0, "end": 10}, {"device": "worker-2", "start": 10, "end": 20},
                            {"device": "worker-1", "start": 20, "end": 30}]}]


@pytest.fixture
def store(database_url):
    init_schema(database_url)
    s = open_store(database_url)
    yield s
    s.close()


def test_a_missing_store_says_to_run_init_and_init_is_idempotent(database_url):
    with pytest.raises(NoStore, match="run `pipeshift init`"):
        open_store(database_url)
    assert init_schema(database_url) == (None, "0005")
    assert init_schema(database_url) == ("0005", "0005")
    open_store(database_url).close()


def test_alembic_round_trip_and_no_drift_between_models_and_migrations(database_url):
    from alembic import command

    config = alembic_config(database_url)
    command.upgrade(config, "head")
    command.downgrade(config, "base")
    with pytest.raises(NoStore):
        open_store(database_url)
    command.upgrade(config, "head")
    command.check(config)  # raises when the models and the migrations differ
    open_store(database_url).close()


def test_alembic_from_the_repository_root_reads_the_programs_url(tmp_path):
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    env = {**os.environ, "PIPESHIFT_DATABASE_URL": url}
    alembic = [sys.executable, "-m", "alembic"]
    for args in (["upgrade", "head"], ["check"], ["downgrade", "base"], ["upgrade", "head"]):
        done = subprocess.run(alembic + args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
    open_store(url).close()


def test_configurations_count_up_in_one_lineage(store):
    first = store.record_configuration("SmolLM2-135M", TWO_STAGES, "observed", epoch=1)
    second = store.record_configuration("SmolLM2-135M", THREE_STAGES, "apply", epoch=2)
    assert (first.serial, second.serial) == (1, 2)
    assert second.lineage == first.lineage and second.parent_id == first.id
    assert store.current().id == second.id
    assert store.configuration(first.id).pipelines == TWO_STAGES
    with pytest.raises(UnknownId, match="pipeshift history"):
        store.configuration(999)


def test_a_plan_made_against_an_older_serial_is_stale(store):
    first = store.record_configuration("SmolLM2-135M", TWO_STAGES, "observed")
    plan = store.save_plan(first, THREE_STAGES, diff={"changes": 3}, prediction={"stall_ms": 2.0}, text="~ ...")
    store.check_fresh(store.plan(plan.id))  # still current
    store.record_configuration("SmolLM2-135M", THREE_STAGES, "apply")
    with pytest.raises(StalePlan, match="Saved plan is stale"):
        store.check_fresh(store.plan(plan.id))


def test_a_held_lock_names_its_holder_and_how_to_force_it(store):
    lock = store.lock("deployment", "apply", holder="host-a:1")
    with pytest.raises(LockHeld) as held:
        store.lock("deployment", "apply", holder="host-b:2")
    assert held.value.holder == "host-a:1" and f"pipeshift force-unlock {lock.id}" in str(held.value)
    store.lock("another deployment", "apply")  # other names are independent
    with pytest.raises(UnknownId, match="no lock nope"):
        store.force_unlock("nope")
    store.force_unlock(lock.id)
    store.lock("deployment", "apply", holder="host-b:2")


def test_a_lock_whose_holder_here_is_dead_says_so_and_how_to_free_it(store):
    """It said "if that process is gone, run force-unlock" even when this host could tell it was."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    holder = f"{socket.gethostname()}:{child.pid}"
    lock = store.lock("deployment", "pipeshift apply", holder=holder)
    with pytest.raises(LockHeld) as held:
        store.lock("deployment", "pipeshift apply")
    message = str(held.value)
    assert f"held by {holder}" in message and f"(pid {child.pid}) is no longer running on this host" in message
    assert f"run `pipeshift force-unlock {lock.id}`" in message and "if that process is gone" not in message


@pytest.mark.parametrize("holder", ["this process", "another-host.example:12345"])
def test_a_lock_whose_holder_may_live_keeps_the_cautious_advice(store, holder):
    lock = store.lock("deployment", "pipeshift apply", holder=this_process() if holder == "this process" else holder)
    with pytest.raises(LockHeld) as held:
        store.lock("deployment", "pipeshift apply", holder="someone-else:1")
    message = str(held.value)
    assert f"if that process is gone, run `pipeshift force-unlock {lock.id}`" in message
    assert "no longer running" not in message


def test_an_apply_whose_process_died_is_marked_interrupted(store, database_url):
    current = store.record_configuration("SmolLM2-135M", TWO_STAGES, "observed")
    # A real process begins an apply and dies without finishing it.
    child = (
        "import os, sys\n"
        "from planner.store import open_store\n"
        "s = open_store(sys.argv[1])\n"
        f"row = s.begin_apply(None, {current.id})\n"
        "s.update_apply(row.id, phases=[{'name': 'prefetch', 'state': 'running'}])\n"
        "print(row.id, flush=True)\n"
        "os._exit(9)\n"
    )
    done = subprocess.run([sys.executable, "-c", child, database_url], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 9, done.stderr
    apply_id = done.stdout.strip()
    mine = store.begin_apply(None, current.id)  # this process lives: it stays running
    row = store.apply(apply_id)
    assert row.state == "interrupted" and "ended before the apply did" in row.error
    assert row.phases == [{"name": "prefetch", "state": "running"}]
    assert store.apply(mine.id).state == "running"
    finished = store.finish_apply(mine.id, "applied", bytes_moved=123, stall_ms=1.5)
    assert (finished.state, finished.outcome) == ("done", "applied")


def test_history_lists_configurations_and_applies_in_order(store):
    first = store.record_configuration("SmolLM2-135M", TWO_STAGES, "observed")
    apply = store.begin_apply(None, first.id)
    second = store.record_configuration("SmolLM2-135M", THREE_STAGES, "apply")
    store.finish_apply(apply.id, "applied", to_id=second.id, bytes_moved=10)
    events = store.history()
    assert [(e["type"], e["id"]) for e in events] == [("configuration", first.id), ("apply", apply.id),
                                                      ("configuration", second.id)]
    assert events[1]["outcome"] == "applied" and events[1]["to"] == second.id


def test_devices_seen_and_gone(store):
    store.record_devices([{"name": "worker-0", "kind": "cpu", "state": "serving"},
                          {"name": "worker-1", "kind": "cpu", "state": "spare"}])
    store.record_devices([{"name": "worker-0", "kind": "cpu", "state": "serving"}])
    assert [(d.name, d.state) for d in store.devices()] == [("worker-0", "serving"), ("worker-1", "gone")]


def test_each_change_of_the_fleet_is_a_device_event_in_history(store):
    from planner.history_command import _grouped, device_changes

    fleet = [{"name": "worker-0", "kind": "cpu", "state": "serving"},
             {"name": "worker-1", "kind": "cpu", "state": "serving"}]
    store.record_devices(fleet)
    store.record_devices(fleet)  # nothing changed: no event
    store.record_devices([*fleet, {"name": "worker-2", "kind": "cpu", "state": "spare"}])  # device add
    store.record_devices([fleet[0], {**fleet[1], "state": "drained"},
                          {"name": "worker-2", "kind": "cpu", "state": "serving"}])  # drain onto the spare
    store.record_devices([fleet[0], {"name": "worker-2", "kind": "cpu", "state": "serving"}])
    events = [e for e in store.history() if e["type"] == "device"]
    assert [(e["device"], e["from"], e["to"]) for e in events] == [
        ("worker-0", None, "serving"), ("worker-1", None, "serving"),
        ("worker-2", None, "spare"),
        ("worker-1", "serving", "drained"), ("worker-2", "spare", "serving"),
        ("worker-1", "drained", "gone"),
    ]
    lines = [device_changes(group) for _, group in _grouped(events)]
    assert lines == ["worker-0 joined (cpu, serving); worker-1 joined (cpu, serving)",
                     "worker-2 joined (cpu, spare)",
                     "worker-1 serving -> drained; worker-2 spare -> serving",
                     "worker-1 gone (was drained)"]


def test_the_commands_say_what_to_do(tmp_path):
    url = f"sqlite:///{tmp_path / 'cli.db'}"

    def pipeshift(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "planner.cli", *args, "--database-url", url],
                              capture_output=True, text=True, timeout=120, cwd=tmp_path)

    missing = pipeshift("history")
    assert missing.returncode == 1 and "run `pipeshift init`" in missing.stderr
    assert "Created the store" in pipeshift("init").stdout
    assert "up to date" in pipeshift("init").stdout
    assert "The store is empty" in pipeshift("history").stdout
    unknown = pipeshift("force-unlock", "nope")
    assert unknown.returncode == 1 and "nothing is locked" in unknown.stderr
