"""Alembic environment of pipeshift's store: the URL is the program's own (`pipeshift init`
passes it; `alembic` on the command line gets it from planner.store.database_url())."""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context

from planner.store.database import database_url, make_engine
from planner.store.models import Base

config = context.config
if config.config_file_name is not None and config.attributes.get("url") is None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata


def run_migrations_offline() -> None:
    context.configure(url=config.attributes.get("url") or database_url(), target_metadata=target_metadata,
                      literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = make_engine(config.attributes.get("url") or database_url())
    try:
        with engine.connect() as connection:
            # batch mode: SQLite alters tables by copying them
            context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
