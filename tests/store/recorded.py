"""Test helper: stores holding what commands read back."""

from __future__ import annotations

from planner.store import init_schema, open_store

WHOLE_MODEL = [{"stages": [{"device": "worker-0", "start": 0, "end": 30}]}]


def store_with_one_apply(url: str) -> str:
    """Makes the store at `url` hold one observed configuration and one applied apply from it
    (1 byte moved); returns the apply's id."""
    init_schema(url)
    store = open_store(url)
    try:
        first = store.record_configuration("SmolLM2-135M", WHOLE_MODEL, "observed")
        row = store.begin_apply(None, first.id)
        store.finish_apply(row.id, "applied", bytes_moved=1)
        return row.id
    finally:
        store.close()
