"""Where pipeshift finds its files: the data (device and model catalogs, example specs and the
traces they name) and the store's Alembic migrations.

From a checkout they are the repository's `data/` and `migrations/`. An installed wheel carries
the same folders as the packages `pipeshift_data` and `pipeshift_migrations` (pyproject.toml
maps them), found through importlib.resources. $PIPESHIFT_DATA_DIR overrides the data folder.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

DATA_VARIABLE = "PIPESHIFT_DATA_DIR"
CHECKOUT = Path(__file__).resolve().parents[1]  # the repository root when run from a checkout


def _folder(checkout_name: str, package: str) -> Path:
    """Returns the checkout's folder when this code runs from a checkout, else the installed
    data package's folder."""
    if (CHECKOUT / "pyproject.toml").is_file() and (CHECKOUT / checkout_name).is_dir():
        return CHECKOUT / checkout_name
    return Path(str(resources.files(package)))


def data_dir() -> Path:
    """Returns the folder of devices.yaml, models.yaml, specs/ and traces/."""
    override = os.environ.get(DATA_VARIABLE)
    return Path(override) if override else _folder("data", "pipeshift_data")


def specs_dir() -> Path:
    """Returns the folder of the example specs (`pipeshift examples` lists them)."""
    return data_dir() / "specs"


def migrations_dir() -> Path:
    """Returns Alembic's script location (env.py, versions/) for the store's schema."""
    return _folder("migrations", "pipeshift_migrations")


DATA_DIR = data_dir()
