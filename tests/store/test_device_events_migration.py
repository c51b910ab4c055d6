"""The 0004 migration adds device events and an apply's source to a store made at 0003: its
applies and devices stay (a source of None, listed as `apply`), a device it knew gets an event
only when it changes, and a downgrade takes both away again."""

from __future__ import annotations

from alembic import command
from sqlalchemy import create_engine, inspect, text

from planner.store import init_schema, open_store
from planner.store.database import alembic_config


def test_the_upgrade_from_0003_keeps_applies_and_devices(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    config = alembic_config(url)
    command.upgrade(config, "0003")
    engine = create_engine(url)
    with engine.begin() as c:
        c.execute(text("INSERT INTO applies (id, state, outcome, holder, phases, bytes_moved, started_at) "
                       "VALUES ('a-1', 'done', 'applied', 'h:1', '[]', 4096, '2026-11-28 10:00:00')"))
        c.execute(text("INSERT INTO devices (name, kind, node, state, first_seen, last_seen) "
                       "VALUES ('worker-0', 'cpu', 'local', 'serving', '2026-11-28 10:00:00', '2026-11-28 10:00:00')"))
    engine.dispose()
    assert init_schema(url) == ("0003", "0004")
    store = open_store(url)
    try:
        assert (store.apply("a-1").source, store.apply("a-1").bytes_moved) == (None, 4096)
        store.record_devices([{"name": "worker-0", "kind": "cpu", "state": "serving"}])  # known, unchanged
        assert store.device_events() == []
        store.record_devices([{"name": "worker-0", "kind": "cpu", "state": "drained"}])
        assert [(e.device, e.state_from, e.state_to) for e in store.device_events()] == [
            ("worker-0", "serving", "drained")]
        assert [e["type"] for e in store.history()] == ["apply", "device"]
    finally:
        store.close()
    command.downgrade(config, "0003")
    engine = create_engine(url)
    assert "device_events" not in inspect(engine).get_table_names()
    assert "source" not in {c["name"] for c in inspect(engine).get_columns("applies")}
    with engine.connect() as c:
        assert c.execute(text("SELECT id FROM applies")).scalars().all() == ["a-1"]
    engine.dispose()
