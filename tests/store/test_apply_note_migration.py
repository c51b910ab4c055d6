"""The 0003 migration adds an apply's note to a store made at 0002, keeping the applies it holds
(their note empty), and takes it away again on downgrade."""

from __future__ import annotations

from alembic import command
from sqlalchemy import create_engine, inspect, text

from planner.store import init_schema, open_store
from planner.store.database import alembic_config


def test_the_upgrade_from_0002_adds_the_note_and_keeps_the_applies(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    config = alembic_config(url)
    command.upgrade(config, "0002")
    engine = create_engine(url)
    with engine.begin() as c:
        c.execute(text("INSERT INTO applies (id, state, outcome, error, holder, phases, bytes_moved, started_at) "
                       "VALUES ('a-1', 'done', 'applied', NULL, 'h:1', '[]', 4096, '2026-11-28 10:00:00')"))
    engine.dispose()
    assert init_schema(url) == ("0002", "0004")
    store = open_store(url)
    try:
        row = store.apply("a-1")
        assert (row.outcome, row.bytes_moved, row.note) == ("applied", 4096, None)
    finally:
        store.close()
    command.downgrade(config, "0002")
    engine = create_engine(url)
    assert "note" not in {c["name"] for c in inspect(engine).get_columns("applies")}
    with engine.connect() as c:
        assert c.execute(text("SELECT id FROM applies")).scalars().all() == ["a-1"]
    engine.dispose()
