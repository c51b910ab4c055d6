"""The 0003 migration adds an apply's note to a store made at 0002, keeping the applies it holds
(their note empty), and takes it away again on downgrade; 0004 adds device events and an
apply's source the same way."""

from __future__ import annotations

from planner.store import init_schema, open_store
from tests.store.old_stores import downgraded, store_made_at

AN_APPLY = ("INSERT INTO applies (id, state, outcome, holder, phases, bytes_moved, started_at) "
            "VALUES ('a-1', 'done', 'applied', 'h:1', '[]', 4096, '2026-11-28 10:00:00')", {})
A_DEVICE = ("INSERT INTO devices (name, kind, node, state, first_seen, last_seen) "
            "VALUES ('worker-0', 'cpu', 'local', 'serving', '2026-11-28 10:00:00', '2026-11-28 10:00:00')", {})


def test_the_upgrade_from_0002_adds_the_note_and_keeps_the_applies(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    config = store_made_at(url, "0002", AN_APPLY)
    assert init_schema(url) == ("0002", "0005")
    store = open_store(url)
    try:
        row = store.apply("a-1")
        assert (row.outcome, row.bytes_moved, row.note) == ("applied", 4096, None)
    finally:
        store.close()
    tables, applies = downgraded(config, url, "0002")
    assert "note" not in tables["applies"] and applies == ["a-1"]


def test_the_upgrade_from_0003_adds_device_events_and_sources_and_keeps_the_rows(tmp_path) -> None:
    """A device the store knew gets an event only when it changes; an apply recorded before has
    no source (`history` lists it as `apply`)."""
    url = f"sqlite:///{tmp_path / 'store.db'}"
    config = store_made_at(url, "0003", AN_APPLY, A_DEVICE)
    assert init_schema(url) == ("0003", "0005")
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
    tables, applies = downgraded(config, url, "0003")
    assert "device_events" not in tables and "source" not in tables["applies"] and applies == ["a-1"]
