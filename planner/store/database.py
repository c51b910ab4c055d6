"""Where the store lives and how its schema is made: the URL, Alembic, and opening it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from sqlalchemy import create_engine, inspect
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError

from cost_models.paths import migrations_dir

URL_VARIABLE = "PIPESHIFT_DATABASE_URL"


class NoStore(RuntimeError):
    """The store does not exist or its schema is not the one this pipeshift needs."""


def data_dir() -> Path:
    """Returns the user's pipeshift data directory ($XDG_DATA_HOME/pipeshift by default)."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "pipeshift"


def database_url() -> str:
    """Returns $PIPESHIFT_DATABASE_URL, or a SQLite file in the user's data directory."""
    return os.environ.get(URL_VARIABLE) or f"sqlite:///{data_dir() / 'pipeshift.db'}"


URL_EXAMPLES = "sqlite:///PATH/pipeshift.db or postgresql+psycopg://USER@HOST/DB"


def parse_url(url: str) -> URL:
    """Returns the parsed SQLAlchemy URL; raises NoStore saying what a store URL looks like."""
    try:
        return make_url(url)
    except ArgumentError:
        raise NoStore(
            f"the store URL {url!r} is not a SQLAlchemy URL: give one such as {URL_EXAMPLES}"
        ) from None


def shown(url: str) -> str:
    """Returns the URL with any password hidden, for messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "the URL given"


def make_engine(url: str) -> Engine:
    """Returns the engine of `url`; raises NoStore for a malformed URL, an unknown database
    or one whose driver is not installed, saying what to do."""
    parsed = parse_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        folder = Path(parsed.database).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise NoStore(
                f"cannot make the folder {folder} of the store {shown(url)} "
                f"({exc.strerror or exc}): give a store in a folder you can write, with "
                f"--database-url or {URL_VARIABLE} (or XDG_DATA_HOME for the default one)"
            ) from None
    try:
        return create_engine(parsed)
    except NoSuchModuleError:
        raise NoStore(
            f"the store URL {shown(url)} names a database SQLAlchemy does not know "
            f"({parsed.drivername}): give one such as {URL_EXAMPLES}"
        ) from None
    except ImportError as exc:
        raise NoStore(
            f"the driver of the store URL {shown(url)} is not installed ({exc.name or exc}): "
            "install it (PostgreSQL: pip install 'psycopg[binary]' and a URL starting "
            "postgresql+psycopg://)"
        ) from None


def alembic_config(url: str):
    from alembic.config import Config

    config = Config(stdout=sys.stdout)  # Config's default is the sys.stdout of when alembic was imported
    config.set_main_option("script_location", str(migrations_dir()))
    config.attributes["url"] = url
    return config


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    if "alembic_version" not in inspect(engine).get_table_names():
        return None
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def init_schema(url: str | None = None) -> tuple[str | None, str]:
    """Creates the store or upgrades its schema to this pipeshift's; returns (before, after)
    revisions."""
    from alembic import command

    url = url or database_url()
    engine = make_engine(url)
    try:
        before = current_revision(engine)
    except Exception as exc:
        raise NoStore(f"cannot reach the store at {shown(url)}: {exc}") from exc
    finally:
        engine.dispose()
    command.upgrade(alembic_config(url), "head")
    return before, head_revision()


def open_store(url: str | None = None):
    """Returns the Store at `url` (default database_url()); raises NoStore, saying what to
    run, when it is missing or its schema is older than this pipeshift's."""
    from planner.store.records import Store

    url = url or database_url()
    missing = f"no pipeshift store at {shown(url)}: run `pipeshift init` to create it"
    parsed = parse_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database and parsed.database != ":memory:" \
            and not Path(parsed.database).exists():  # do not leave an empty file behind
        raise NoStore(missing)
    engine = make_engine(url)
    try:
        revision = current_revision(engine)
    except Exception as exc:
        engine.dispose()
        raise NoStore(f"cannot reach the store at {shown(url)}: {exc}") from exc
    head = head_revision()
    if revision != head:
        engine.dispose()
        if revision is None:
            raise NoStore(missing)
        raise NoStore(f"the store at {shown(url)} has schema {revision}, this pipeshift needs {head}: "
                      "run `pipeshift init` to upgrade it")
    return Store(engine)
