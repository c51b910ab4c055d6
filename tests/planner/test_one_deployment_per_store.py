"""A store is the history of one deployment. A command against a second serving process, with the
store of the first, used to mix the two into one history and report false drift at every
switch; now the refresh asks the server the store recorded (briefly): while that one answers
with another deployment, the command is refused and nothing is recorded; once it no longer
answers, the deployment moved (a restart at another address) and is recorded at its new one.
A store made before configurations had a server adopts the first server read. The admin API is
answered by canned replies, one deployment per address."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from planner.admin_client import AdminClient, AdminError
from planner.api.app import create_planner_app
from planner.cli import main
from planner.deployment_state import refresh
from planner.operations import OperationError
from planner.store import open_store
from tests.planner.test_plan_against_server import SPEC  # two CPU devices, SmolLM2

A, B, C = "http://127.0.0.1:8141", "http://127.0.0.1:8142", "http://127.0.0.1:8143"
TWO = [{"stages": [{"device": "worker-0", "start": 0, "end": 15}, {"device": "worker-1", "start": 15, "end": 30}]}]
ONE = [{"stages": [{"device": "worker-0", "start": 0, "end": 30}]}]


def deployment(pipelines: list[Any], epoch: int = 1, pids: tuple[int, int] | None = None) -> dict[str, Any]:
    return {"model": "SmolLM2-135M", "epoch": epoch, "configuration": {"pipelines": pipelines},
            "devices": [{"name": f"worker-{i}", "kind": "cpu", "state": "serving",
                         **({"pid": pids[i]} if pids else {})} for i in range(2)]}


class Servers:
    """The admin APIs at several addresses: each serves its deployment, or nothing answers there."""

    def __init__(self, monkeypatch, **at: dict[str, Any]):
        self.at: dict[str, dict[str, Any] | None] = dict(at)
        self.asked: list[str] = []
        self.applied: list[str] = []
        monkeypatch.setattr(AdminClient, "deployment", lambda client: self.deployment(client))
        monkeypatch.setattr(AdminClient, "plan", lambda client, target, *a, **k: {
            "plan": {"has_changes": True}, "text": "  ~ pipeline 0 ...", "feasible": True})
        monkeypatch.setattr(AdminClient, "apply", lambda client, *a, **k: self.applied.append(client.server))
        monkeypatch.setattr(AdminClient, "add_device", lambda client, *a, **k: self.applied.append(client.server))
        monkeypatch.setattr(AdminClient, "applies", lambda client: [])

    def deployment(self, client: AdminClient) -> dict[str, Any]:
        self.asked.append(client.server)
        served = self.at.get(client.server)
        if served is None:
            raise AdminError(f"no pipeshift server answers at {client.server} (Connection refused): start one")
        return served


@pytest.fixture
def spec(tmp_path: Path) -> str:
    path = tmp_path / "spec.yaml"
    path.write_text(SPEC)
    return str(path)


def plan(url: str, spec: str, server: str, *args: str) -> int:
    return main(["plan", "-f", spec, "--server", server, "--database-url", url, "--time-limit", "5", *args])


def history(url: str, capsys) -> list[dict[str, Any]]:
    assert main(["history", "--json", "--database-url", url]) == 0
    return json.loads(capsys.readouterr().out)


def test_a_second_deployment_that_answers_is_refused_and_nothing_is_recorded(store_url, spec, monkeypatch,
                                                                             capsys) -> None:
    servers = Servers(monkeypatch, **{A: deployment(TWO), B: deployment(ONE, epoch=4)})
    assert plan(store_url, spec, "127.0.0.1:8141") == 0
    capsys.readouterr()
    before = history(store_url, capsys)
    assert [(e["type"], e.get("server")) for e in before if e["type"] == "configuration"] == [("configuration", A)]

    assert plan(store_url, spec, "127.0.0.1:8142") == 1
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1, err
    assert err.startswith("pipeshift plan: error: this store holds the history of the deployment at "
                          f"{A}, which still answers; {B} is another deployment, so nothing was recorded")
    assert "--database-url sqlite:///PATH/other.db" in err and "PIPESHIFT_DATABASE_URL" in err
    assert "drift" not in err and A in servers.asked  # it asked the recorded server before refusing

    # an apply and a device add against it are refused the same way, before the server is changed
    assert main(["apply", "--stages", "0:30", "--server", B, "--auto-approve", "--database-url", store_url]) == 1
    assert f"{B} is another deployment" in capsys.readouterr().err
    assert main(["device", "add", "--server", B, "--database-url", store_url]) == 1
    assert f"{B} is another deployment" in capsys.readouterr().err
    assert servers.applied == []
    assert history(store_url, capsys) == before
    store = open_store(store_url)
    try:
        assert store.locks() == []  # the apply's lock went with the refusal
    finally:
        store.close()

    # the first deployment goes on as before: no drift, nothing new
    assert plan(store_url, spec, A, "--json") == 0
    assert json.loads(capsys.readouterr().out)["drift"] is None
    assert history(store_url, capsys) == before


def test_a_deployment_that_moved_is_recorded_at_its_new_address(store_url, spec, monkeypatch, capsys) -> None:
    servers = Servers(monkeypatch, **{A: deployment(TWO, epoch=3)})
    assert plan(store_url, spec, A) == 0
    capsys.readouterr()
    servers.at = {B: deployment(TWO, epoch=1)}  # restarted at another address, serving the same

    assert plan(store_url, spec, B) == 0
    out = capsys.readouterr().out
    assert (f"Note: the deployment this store records moved from {A}, which no longer answers, to {B}; "
            "recorded it there as serial 2.") in out
    assert "with a configuration other than the one recorded last" not in out  # no false drift
    configurations = [e for e in history(store_url, capsys) if e["type"] == "configuration"]
    assert [(c["serial"], c["source"], c["epoch"], c["server"]) for c in configurations] == [
        (1, "observed", 3, A), (2, "observed", 1, B)]
    assert configurations[0]["note"] is None
    assert configurations[1]["note"] == f"the deployment moved from {A}, which no longer answers, to {B}"

    assert main(["show", "--database-url", store_url]) == 0
    shown = capsys.readouterr().out
    assert f"  server: {B}\n" in shown and f"  note: the deployment moved from {A}" in shown
    assert main(["history", "--database-url", store_url]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "configuration" in line]
    assert lines[0].endswith(f"at {A}") and f"at {B}  (the deployment moved from {A}" in lines[1], lines

    # from there on it is the deployment at B: nothing new, no note; and it moved with what it served
    assert plan(store_url, spec, B, "--json") == 0
    answer = json.loads(capsys.readouterr().out)
    assert (answer["drift"], answer["moved"]) == (None, None)
    servers.at = {C: deployment(ONE, epoch=2)}
    refreshed = refresh_at(store_url, C)
    assert refreshed.moved.startswith(f"the deployment this store records moved from {B}")
    assert refreshed.drift.startswith("the deployment serves epoch 2 with a configuration other than")
    assert (refreshed.current.serial, refreshed.current.server) == (3, C)


def refresh_at(url: str, server: str):
    store = open_store(url)
    try:
        client = AdminClient(server)
        return refresh(store, client.deployment(), client)
    finally:
        store.close()


def test_one_deployment_under_two_addresses_is_not_another(store_url, monkeypatch) -> None:
    """The same workers answer at both: localhost and 127.0.0.1 of one server."""
    same = deployment(TWO, pids=(4101, 4102))
    Servers(monkeypatch, **{A: same, "http://localhost:8141": same})
    first = refresh_at(store_url, A)
    again = refresh_at(store_url, "localhost:8141")
    assert (again.current.id, again.current.server, again.drift, again.moved) == (first.current.id, A, None, None)
    # another process under the other address (other workers) is another deployment
    Servers(monkeypatch, **{A: same, "http://localhost:8141": deployment(TWO, pids=(5101, 5102))})
    with pytest.raises(OperationError, match="another deployment") as refused:
        refresh_at(store_url, "localhost:8141")
    assert refused.value.status == 409


def test_a_configuration_without_a_server_adopts_the_first_one_read(store_url, monkeypatch) -> None:
    """The serving process's own controller refreshes without a client; the store made before
    configurations had a server: the first command's server is adopted, not refused."""
    store = open_store(store_url)
    try:
        unknown = refresh(store, deployment(TWO)).current
        assert unknown.server is None
    finally:
        store.close()
    Servers(monkeypatch, **{A: deployment(TWO), B: deployment(TWO, epoch=2)})
    adopted = refresh_at(store_url, B)
    assert (adopted.current.id, adopted.current.server, adopted.drift, adopted.moved) == (unknown.id, B, None, None)
    store = open_store(store_url)
    try:
        # what the controller records after is at the same server
        later = refresh(store, deployment(ONE, epoch=3)).current
        assert (later.serial, later.server) == (2, B)
    finally:
        store.close()
    with pytest.raises(OperationError, match=f"history of the deployment at {B}"):
        refresh_at(store_url, A)


def test_the_planner_api_answers_409_for_another_deployment(store_url, monkeypatch) -> None:
    Servers(monkeypatch, **{A: deployment(TWO), B: deployment(ONE)})
    refresh_at(store_url, A)
    store = open_store(store_url)
    try:
        before = store.history()
        api = TestClient(create_planner_app(store, "127.0.0.1:8142"))
        for path, body in (("/v1/rollback", {"configuration_id": 1}),
                           ("/v1/plans", {"spec": {"model": "SmolLM2-135M", "dtype": "fp32",
                                                   "devices": [{"kind": "cpu", "count": 2}],
                                                   "workload": {"request_rate_per_s": 0.5, "prompt_tokens": 128,
                                                                "output_tokens": 64, "batch": 4}}})):
            answer = api.post(path, json=body)
            assert answer.status_code == 409, (path, answer.text)
            detail = answer.json()["detail"]
            assert f"deployment at {A}, which still answers; {B} is another deployment" in detail
            assert "--database-url" in detail and "PIPESHIFT_DATABASE_URL" in detail
        assert store.history() == before and store.locks() == []
        listed = api.get("/v1/history")
        assert listed.status_code == 200, listed.text
        assert [e["server"] for e in listed.json()["data"] if e["type"] == "configuration"] == [A]
        assert [c["server"] for c in api.get("/v1/configurations").json()["data"]] == [A]
    finally:
        store.close()
