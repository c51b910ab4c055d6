"""Stores made by an older pipeshift: the schema at an Alembic revision, with rows in it, for
the tests that upgrade them, and the schema left after a downgrade."""

from __future__ import annotations

from typing import Any

from alembic import command
from sqlalchemy import create_engine, inspect, text

from planner.store.database import alembic_config


def store_made_at(url: str, revision: str, *rows: tuple[str, dict[str, Any]]):
    """Makes the store at `url` as `revision` left it, holding `rows` (SQL INSERTs with their
    parameters); returns its Alembic config."""
    config = alembic_config(url)
    command.upgrade(config, revision)
    engine = create_engine(url)
    with engine.begin() as c:
        for statement, parameters in rows:
            c.execute(text(statement), parameters)
    engine.dispose()
    return config


def downgraded(config, url: str, revision: str) -> tuple[dict[str, set[str]], list[str]]:
    """Downgrades to `revision`; returns each table's columns and the ids of the applies kept."""
    command.downgrade(config, revision)
    engine = create_engine(url)
    try:
        tables = {t: {c["name"] for c in inspect(engine).get_columns(t)} for t in inspect(engine).get_table_names()}
        with engine.connect() as c:
            applies = c.execute(text("SELECT id FROM applies")).scalars().all()
        return tables, list(applies)
    finally:
        engine.dispose()
