"""The live controller's decisions in the store: the 0002 migration adds their table to a store
made at 0001 without touching what it holds, every decision reads back with its reason and
figures, and `pipeshift history --decisions` lists them among the configurations and applies."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from planner.store import init_schema, open_store
from tests.store.old_stores import downgraded, store_made_at

TWO_STAGES = {"pipelines": [{"stages": [{"device": "worker-0", "start": 0, "end": 15},
                                        {"device": "worker-1", "start": 15, "end": 30}]}]}
ONE_STAGE = {"pipelines": [{"stages": [{"device": "worker-0", "start": 0, "end": 30}]}]}
PREDICTED = {"goodput_current_rps": 0.5, "goodput_target_rps": 0.8, "gain_requests": 40.0, "cost_requests": 1.5,
             "payback_s": 20.0, "stall_ms": 2.0, "prefetch_s": 0.4}
WORKLOAD = {"rate_per_s": 1.2, "prompt_tokens_mean": 96.0, "running": 3, "waiting": 0}


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'store.db'}"


def test_the_upgrade_from_0001_adds_decisions_and_keeps_what_the_store_held(sqlite_url):
    config = store_made_at(sqlite_url, "0001", (
        "INSERT INTO configurations (lineage, serial, model, pipelines, source, created_at) "
        "VALUES ('l', 1, 'SmolLM2-135M', :p, 'observed', '2026-11-28 10:00:00')",
        {"p": json.dumps(TWO_STAGES["pipelines"])}))
    assert init_schema(sqlite_url) == ("0001", "0005")
    store = open_store(sqlite_url)
    try:
        assert [c.pipelines for c in store.configurations()] == [TWO_STAGES["pipelines"]]
        assert store.decisions() == []
        store.record_decision(1, "propose", False, "dwell: 12 s since the last apply", TWO_STAGES, ONE_STAGE,
                              PREDICTED, WORKLOAD)
        assert len(store.decisions()) == 1
    finally:
        store.close()
    tables, _ = downgraded(config, sqlite_url, "0001")  # and back: the table goes, the rest stays
    assert "decisions" not in tables and "configurations" in tables


def test_every_decision_reads_back_with_its_reason_and_figures(sqlite_url):
    init_schema(sqlite_url)
    store = open_store(sqlite_url)
    try:
        against = store.record_configuration("SmolLM2-135M", TWO_STAGES["pipelines"], "observed", epoch=1)
        plan = store.save_plan(against, ONE_STAGE["pipelines"], diff={}, prediction={}, text="~")
        t0 = datetime.now(UTC) + timedelta(seconds=1)  # after the configuration
        keep = store.record_decision(1, "auto", False, "no change: the gain does not pay back within 600 s",
                                     TWO_STAGES, ONE_STAGE, PREDICTED, WORKLOAD, decided_at=t0)
        act = store.record_decision(2, "auto", True, "gains 40.0 requests over 600 s, costs 1.5", TWO_STAGES,
                                    ONE_STAGE, PREDICTED, WORKLOAD, decided_at=t0 + timedelta(seconds=15),
                                    plan_id=plan.id, server_apply_id="apply-1-abcdef")
        refused = store.record_decision(3, "auto", True, "gains", TWO_STAGES, ONE_STAGE, PREDICTED, WORKLOAD,
                                        decided_at=t0 + timedelta(seconds=30), error="apply apply-1 is in progress")
        rows = store.decisions()
        assert [r.id for r in rows] == [keep.id, act.id, refused.id] and [r.serial for r in rows] == [1, 2, 3]
        assert [r.act for r in rows] == [False, True, True]
        assert rows[0].reason.startswith("no change: the gain does not pay back")
        assert rows[1].predicted == PREDICTED and rows[1].workload == WORKLOAD and rows[1].target == ONE_STAGE
        assert (rows[1].plan_id, rows[1].server_apply_id) == (plan.id, "apply-1-abcdef")
        assert rows[2].error == "apply apply-1 is in progress" and ":" in rows[2].holder
        assert [r.id for r in store.decisions(limit=2)] == [act.id, refused.id]  # the newest, oldest first

        assert [e["type"] for e in store.history()] == ["configuration"]  # as before, unless asked
        events = store.history(decisions=True)
        assert [e["type"] for e in events] == ["configuration", "decision", "decision", "decision"]
        assert events[2]["reason"].startswith("gains") and events[2]["plan"] == plan.id
    finally:
        store.close()


def test_history_lists_the_decisions_when_asked(sqlite_url, capsys):
    from planner.cli import main

    init_schema(sqlite_url)
    store = open_store(sqlite_url)
    try:
        store.record_decision(7, "propose", True, "gains 40.0 requests over 600 s, costs 1.5 (payback 20 s)",
                              TWO_STAGES, ONE_STAGE, PREDICTED, WORKLOAD)
        store.record_decision(8, "propose", False, "dwell: 3 s since the last apply, 300 s needed", TWO_STAGES,
                              TWO_STAGES, PREDICTED, WORKLOAD)
    finally:
        store.close()
    assert main(["history", "--decisions", "--database-url", sqlite_url]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert "decision 1    propose propose" in lines[0] and "gains 40.0 requests" in lines[0]
    assert "goodput 0.500 -> 0.800 req/s, stall 2.0 ms" in lines[0]
    assert "keep" in lines[1] and "dwell: 3 s since the last apply" in lines[1]
    assert main(["history", "--database-url", sqlite_url]) == 0
    assert "decision" not in capsys.readouterr().out
    assert main(["history", "--decisions", "--json", "--database-url", sqlite_url]) == 0
    events = json.loads(capsys.readouterr().out)
    assert [(e["serial"], e["act"]) for e in events] == [(7, True), (8, False)]


def test_old_decisions_are_pruned_and_the_rest_kept_in_order(sqlite_url):
    init_schema(sqlite_url)
    store = open_store(sqlite_url)
    try:
        conf = store.record_configuration("SmolLM2-135M", TWO_STAGES["pipelines"], "observed", epoch=1)
        for serial in range(1, 8):
            store.record_decision(serial, "auto", False, f"no gain {serial}", TWO_STAGES, TWO_STAGES,
                                  PREDICTED, WORKLOAD)
        assert store.prune_decisions(10) == 0
        assert store.prune_decisions(3) == 4
        assert [r.serial for r in store.decisions()] == [5, 6, 7]
        assert store.prune_decisions(0) == 3 and store.decisions() == []
        assert [c.id for c in store.configurations()] == [conf.id]  # never pruned
        with pytest.raises(ValueError, match="keep must be >= 0"):
            store.prune_decisions(-1)
    finally:
        store.close()


def test_the_planner_api_lists_decisions_in_its_history_when_asked(sqlite_url):
    from fastapi.testclient import TestClient

    from planner.api.app import create_planner_app

    init_schema(sqlite_url)
    store = open_store(sqlite_url)
    try:
        store.record_configuration("SmolLM2-135M", TWO_STAGES["pipelines"], "observed", epoch=1)
        store.record_decision(1, "auto", True, "gains 40.0 requests over 600 s, costs 1.5", TWO_STAGES,
                              ONE_STAGE, PREDICTED, WORKLOAD, decided_at=datetime.now(UTC) + timedelta(seconds=1))
        api = TestClient(create_planner_app(store, "http://127.0.0.1:9"))
        assert [e["type"] for e in api.get("/v1/history").json()["data"]] == ["configuration"]
        events = api.get("/v1/history", params={"decisions": "true"}).json()["data"]
        assert [e["type"] for e in events] == ["configuration", "decision"]
        assert events[1]["reason"].startswith("gains 40.0") and events[1]["target"] == ONE_STAGE
        assert api.get("/v1/history", params={"decisions": "maybe"}).status_code == 422
    finally:
        store.close()
