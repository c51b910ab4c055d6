"""The SQL history of a deployment: devices, configurations, plans, applies, locks, and the
live controller's decisions.

SQLite by default (a file in the user's data directory), PostgreSQL (or any SQLAlchemy URL)
when `PIPESHIFT_DATABASE_URL` says so. The schema is made by Alembic (`migrations/`);
`pipeshift init` creates or upgrades it.
"""

from planner.store.database import NoStore, database_url, init_schema, open_store
from planner.store.records import LockHeld, StalePlan, Store, UnknownId

__all__ = ["LockHeld", "NoStore", "StalePlan", "Store", "UnknownId", "database_url", "init_schema", "open_store"]
