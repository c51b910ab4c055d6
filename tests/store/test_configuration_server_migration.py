"""The 0005 migration gives configurations a server (the deployment's admin URL) and a note: a
store made at 0004 keeps its configurations, without a server, and the first refresh from a
server adopts that server's address instead of refusing it as another deployment's; downgrade
takes both columns away again and keeps the rows."""

from __future__ import annotations

from sqlalchemy import create_engine, text

from planner.admin_client import AdminClient
from planner.deployment_state import refresh
from planner.store import init_schema, open_store
from tests.store.old_stores import downgraded, store_made_at

PIPELINES = '[{"stages": [{"device": "worker-0", "start": 0, "end": 30}]}]'
A_CONFIGURATION = ("INSERT INTO configurations (lineage, serial, model, pipelines, source, epoch, created_at) "
                   "VALUES ('lineage-1', 1, 'SmolLM2-135M', :pipelines, 'observed', 3, '2026-11-28 10:00:00')",
                   {"pipelines": PIPELINES})
SERVER = "http://127.0.0.1:8144"
DEPLOYMENT = {"model": "SmolLM2-135M", "epoch": 3,
              "configuration": {"pipelines": [{"stages": [{"device": "worker-0", "start": 0, "end": 30}]}]},
              "devices": [{"name": "worker-0", "kind": "cpu", "state": "serving"}]}


class Answers(AdminClient):
    def deployment(self):
        return DEPLOYMENT

    def applies(self):
        return []


def test_the_upgrade_from_0004_keeps_the_configurations_and_the_first_server_is_adopted(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    config = store_made_at(url, "0004", A_CONFIGURATION)
    assert init_schema(url) == ("0004", "0005")
    store = open_store(url)
    try:
        (kept,) = store.configurations()
        assert (kept.serial, kept.epoch, kept.server, kept.note) == (1, 3, None, None)
        refreshed = refresh(store, DEPLOYMENT, Answers(SERVER))
        assert (refreshed.current.id, refreshed.current.server, refreshed.drift, refreshed.moved) == (
            kept.id, SERVER, None, None)
        assert [(c.id, c.server) for c in store.configurations()] == [(kept.id, SERVER)]
    finally:
        store.close()
    tables, _ = downgraded(config, url, "0004")
    assert not {"server", "note"} & tables["configurations"]
    engine = create_engine(url)
    try:
        with engine.connect() as c:
            assert c.execute(text("SELECT serial, epoch FROM configurations")).all() == [(1, 3)]
    finally:
        engine.dispose()
