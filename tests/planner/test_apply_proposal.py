"""A proposal of `serve --controller propose` is a plan the store holds: `pipeshift history
--decisions` says how to apply it, and `pipeshift apply PLAN_ID` applies it (after a `yes`, as
no one reviewed it yet); an id the store does not hold says where ids come from. The admin API is
answered by canned replies (the live controller is tests/integration/test_device_drain_live.py's)."""

from __future__ import annotations

import builtins
from pathlib import Path
from typing import Any

import pytest

from planner.admin_client import AdminClient
from planner.cli import main
from planner.deployment_state import refresh
from planner.store import open_store

CURRENT = {"pipelines": [{"stages": [{"device": "worker-0", "start": 0, "end": 15},
                                     {"device": "worker-1", "start": 15, "end": 30}]}]}
TARGET = {"pipelines": [{"stages": [{"device": "worker-0", "start": 0, "end": 30}]}]}
DEPLOYMENT = {"model": "SmolLM2-135M", "epoch": 1, "configuration": CURRENT,
              "devices": [{"name": "worker-0", "state": "serving"}, {"name": "worker-1", "state": "serving"}]}
DONE = {"id": "apply-1-abcdef", "state": "done", "outcome": "applied", "error": None, "epoch_from": 1,
        "epoch_to": 2, "target": TARGET, "phases": [], "predicted": {"bytes_moved": 1, "prefetch_s": 1.0,
                                                                     "precopy_s": 0.0, "stall_ms": 2.0},
        "measured": {"bytes_moved": 1, "prefetch_s": 1.0, "precopy_s": 0.0, "stall_ms": 0.5}}


@pytest.fixture(params=[[], ["r3"]], ids=["kv-fits", "drops-kv"])
def proposed(request, tmp_path: Path, monkeypatch, capsys) -> tuple[str, str, list]:
    """A store holding the controller's proposal CURRENT -> TARGET, once whose KV fits and once
    that drops a request's KV (the controller may, out of a configuration losing requests);
    returns (url, plan id, applied)."""
    url = f"sqlite:///{tmp_path / 'store.db'}"
    assert main(["init", "--database-url", url]) == 0
    capsys.readouterr()
    store = open_store(url)
    try:
        current = refresh(store, DEPLOYMENT).current
        plan = store.save_plan(current, TARGET["pipelines"], {"has_changes": True, "recompute": request.param},
                               {}, "  ~ pipeline 0 ...")
        store.record_decision(3, "propose", True, "value 0.2 -> 0.7 req/s", CURRENT, TARGET,
                              {"goodput_current_rps": 1.2, "goodput_target_rps": 1.2, "stall_ms": 2.0}, {},
                              plan_id=plan.id)
    finally:
        store.close()
    applied: list[dict[str, Any]] = []
    monkeypatch.setattr(AdminClient, "deployment", lambda client: DEPLOYMENT)
    monkeypatch.setattr(AdminClient, "plan", lambda client, body, *a, **k: {
        "plan": {"has_changes": True}, "text": "  ~ pipeline 0 ...", "feasible": True})
    monkeypatch.setattr(AdminClient, "apply", lambda client, body, *a, **k: applied.append(body) or DONE)
    monkeypatch.setattr(AdminClient, "get_apply", lambda client, apply_id: DONE)
    monkeypatch.setattr(AdminClient, "serving", lambda client, apply_id: {"streams": []})
    return url, plan.id, applied


def test_history_says_how_to_apply_a_proposal_and_apply_takes_its_id(proposed, monkeypatch, capsys) -> None:
    url, plan_id, applied = proposed
    assert main(["history", "--decisions", "--database-url", url]) == 0
    assert f"`pipeshift apply {plan_id}` applies it" in capsys.readouterr().out

    monkeypatch.setattr(builtins, "input", lambda prompt: "no")  # no one reviewed it: apply asks
    assert main(["apply", plan_id, "--server", "127.0.0.1:1", "--database-url", url]) == 1
    assert "Apply cancelled." in capsys.readouterr().out and applied == []

    monkeypatch.setattr(builtins, "input", lambda prompt: "yes")
    assert main(["apply", plan_id, "--server", "127.0.0.1:1", "--database-url", url]) == 0
    assert "Apply complete: epoch 2 serves." in capsys.readouterr().out
    assert applied[0]["target"] == TARGET
    # applied as it was made: a plan that drops KV that does not fit asks the server to
    store = open_store(url)
    try:
        drops_kv = bool(store.plan(plan_id).diff["recompute"])
    finally:
        store.close()
    assert applied[0].get("recompute_overflow", False) is drops_kv


def test_an_id_the_store_does_not_hold_says_where_ids_come_from(proposed, capsys) -> None:
    url, _, applied = proposed
    unknown = "00000000-0000-4000-8000-000000000000"
    assert main(["apply", unknown, "--server", "127.0.0.1:1", "--database-url", url]) == 1
    err = capsys.readouterr().err
    assert f"no plan {unknown} in the store: `pipeshift history --decisions` names the controller's proposals" in err
    assert applied == []
