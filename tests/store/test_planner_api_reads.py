"""The planner API's reads answer every row the store can hold: each source a configuration
or apply is recorded under (a drain's, the controller's), each apply state (a detached drain),
device events and decisions. A row the API's models did not know used to be a 500."""

from __future__ import annotations

from typing import get_args

from fastapi.testclient import TestClient

from planner.api.app import create_planner_app
from planner.store import init_schema, open_store
from planner.store.models import Source

STAGES = [{"stages": [{"device": "worker-0", "start": 0, "end": 30}]}]


def test_every_source_state_and_event_reads_back_without_a_server(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    init_schema(url)
    store = open_store(url)
    try:
        configurations = [store.record_configuration("SmolLM2-135M", STAGES, source, epoch=i)
                          for i, source in enumerate(get_args(Source), start=1)]
        applies = [store.begin_apply(None, configurations[0].id, source)
                   for source in get_args(Source) if source != "observed"]
        store.finish_apply(applies[0].id, "applied", to_id=configurations[1].id)
        store.update_apply(applies[1].id, server_apply_id="apply-9-x")
        store.detach_apply(applies[2].id, "not followed (`pipeshift device drain --no-wait`)")
        store.record_devices([{"name": "worker-0", "kind": "cpu", "state": "serving"}])
        store.record_devices([{"name": "worker-0", "kind": "cpu", "state": "drained"}])
        store.record_decision(1, "auto", False, "no gain", {"pipelines": STAGES}, {"pipelines": STAGES}, {}, {})

        api = TestClient(create_planner_app(store, "http://127.0.0.1:9"))
        listed = api.get("/v1/configurations")
        assert listed.status_code == 200, listed.text
        assert [c["source"] for c in listed.json()["data"]] == list(get_args(Source))
        for row in applies:
            read = api.get(f"/v1/applies/{row.id}")
            assert read.status_code == 200, read.text
            assert read.json()["source"] == row.source
        assert api.get(f"/v1/applies/{applies[2].id}").json()["state"] == "detached"
        history = api.get("/v1/history", params={"decisions": "true"})
        assert history.status_code == 200, history.text
        types = [e["type"] for e in history.json()["data"]]
        assert {t: types.count(t) for t in set(types)} == {
            "configuration": len(get_args(Source)), "apply": len(applies), "device": 2, "decision": 1}
    finally:
        store.close()
