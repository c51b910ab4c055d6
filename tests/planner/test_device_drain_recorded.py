"""`pipeshift device drain` with a store is recorded as an apply is: under the deployment's lock,
its row in `pipeshift history` with the configuration it leaves (source `drain`), and the
devices' changes as device events; one not followed (--no-wait) is filled in by the next
refresh; a server lost while following is a line and a `failed` row, not a traceback.
The admin API is answered by canned replies (the live server is
tests/integration/test_device_drain_live.py's)."""

from __future__ import annotations

import json
from typing import Any

from planner.admin_client import AdminClient, AdminError
from planner.cli import main
from planner.store import open_store


def stages(*triples: tuple[str, int, int]) -> dict[str, Any]:
    return {"pipelines": [{"stages": [{"device": d, "start": a, "end": b} for d, a, b in triples]}]}


BEFORE = {
    "model": "SmolLM2-135M", "epoch": 1,
    "configuration": stages(("worker-0", 0, 15), ("worker-1", 15, 30)),
    "devices": [{"name": "worker-0", "state": "serving"}, {"name": "worker-1", "state": "serving"},
                {"name": "worker-2", "state": "spare"}],
}
AFTER = {
    "model": "SmolLM2-135M", "epoch": 2,
    "configuration": stages(("worker-0", 0, 15), ("worker-2", 15, 30)),
    "devices": [{"name": "worker-0", "state": "serving"}, {"name": "worker-1", "state": "drained"},
                {"name": "worker-2", "state": "serving"}],
}
PHASES = [{"name": n, "state": "done"} for n in ("prepare", "prefetch", "precopy", "switch", "cleanup")]
DONE = {"id": "apply-2-abcdef", "state": "done", "outcome": "applied", "error": None, "epoch_from": 1,
        "epoch_to": 2, "target": AFTER["configuration"], "phases": PHASES, "predicted": {"stall_ms": 2.0},
        "measured": {"bytes_moved": 70 << 20, "stall_ms": 0.5}}


class FakeServer:
    """Serves BEFORE until the drain's apply is read done, then AFTER."""

    def __init__(self, monkeypatch):
        self.deployment, self.drains = BEFORE, []
        monkeypatch.setattr(AdminClient, "deployment", lambda client: self.deployment)
        monkeypatch.setattr(AdminClient, "drain", lambda client, device: self.drain(device))
        monkeypatch.setattr(AdminClient, "get_apply", lambda client, apply_id: self.get_apply(apply_id))
        monkeypatch.setattr(AdminClient, "serving", lambda client, apply_id: {"streams": []})
        monkeypatch.setattr(AdminClient, "add_device", lambda client, device, kind: self.add(device))

    def drain(self, device: str) -> dict[str, Any]:
        self.drains.append(device)
        return {"device": device, "state": "draining", "message": f"draining {device}: apply apply-2-abcdef ...",
                "apply": {"id": "apply-2-abcdef"}}

    def get_apply(self, apply_id: str) -> dict[str, Any]:
        self.deployment = AFTER
        return DONE

    def add(self, device: str) -> dict[str, Any]:
        self.deployment = {**AFTER, "devices": [*AFTER["devices"][:1], {"name": device, "state": "spare"},
                                                AFTER["devices"][2]]}
        return {"added": [device], "started": False, "message": f"{device} is available again"}


def device(url: str, *args: str) -> int:
    return main(["device", *args, "--server", "127.0.0.1:1", "--database-url", url])


def history(url: str, capsys) -> list[dict[str, Any]]:
    assert main(["history", "--json", "--database-url", url]) == 0
    return json.loads(capsys.readouterr().out)


def test_a_drain_is_in_the_history_as_an_apply(store_url, monkeypatch, capsys) -> None:
    server = FakeServer(monkeypatch)
    assert device(store_url, "drain", "worker-1") == 0
    out = capsys.readouterr().out
    assert server.drains == ["worker-1"]
    apply_id = out.split("recorded as ")[1].split()[0]
    assert "worker-1 is drained (apply apply-2-abcdef, epoch 2, switch held requests 0.5 ms)" in out
    everything = history(store_url, capsys)
    events = [e for e in everything if e["type"] != "device"]
    assert [(e["type"], e.get("outcome") or e.get("source")) for e in events] == [
        ("configuration", "observed"), ("apply", "applied"), ("configuration", "drain")]
    assert events[1]["source"] == "drain"
    assert [(e["device"], e["from"], e["to"]) for e in everything if e["type"] == "device"] == [
        ("worker-0", None, "serving"), ("worker-1", None, "serving"), ("worker-2", None, "spare"),
        ("worker-1", "serving", "drained"), ("worker-2", "spare", "serving")]
    applied = events[1]
    assert (applied["id"], applied["from"], applied["to"]) == (apply_id, events[0]["id"], events[2]["id"])
    assert events[2]["pipelines"] == AFTER["configuration"]["pipelines"]
    store = open_store(store_url)
    try:
        assert {d.name: d.state for d in store.devices()} == {
            "worker-0": "serving", "worker-1": "drained", "worker-2": "serving"}
        assert store.locks() == []
        assert store.apply(apply_id).server_apply_id == "apply-2-abcdef"
    finally:
        store.close()
    # adding it back records its state, and no configuration (nothing moved)
    assert device(store_url, "add", "worker-1") == 0
    assert "worker-1 is available again" in capsys.readouterr().out
    after_add = history(store_url, capsys)
    assert [e["type"] for e in after_add if e["type"] != "device"] == ["configuration", "apply", "configuration"]
    assert (after_add[-1]["type"], after_add[-1]["device"], after_add[-1]["from"], after_add[-1]["to"]) == (
        "device", "worker-1", "drained", "spare")
    assert main(["history", "--database-url", store_url]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1].endswith("devices  worker-1 drained -> spare"), lines
    assert any(line.endswith("devices  worker-1 serving -> drained; worker-2 spare -> serving") for line in lines)
    assert any(line.split()[2:6] == ["apply", apply_id, "drain", "applied"] for line in lines), lines
    assert main(["show", apply_id, "--database-url", store_url]) == 0
    assert capsys.readouterr().out.startswith(f"apply {apply_id} (drain): applied")
    store = open_store(store_url)
    try:
        assert {d.name: d.state for d in store.devices()}["worker-1"] == "spare"
    finally:
        store.close()


def test_a_drain_waits_for_no_lock_held_by_an_apply(store_url, monkeypatch, capsys) -> None:
    server = FakeServer(monkeypatch)
    store = open_store(store_url)
    try:
        lock = store.lock("deployment at http://127.0.0.1:1", reason="pipeshift apply")
    finally:
        store.close()
    assert device(store_url, "drain", "worker-1") == 1
    err = capsys.readouterr().err
    assert "the deployment is locked" in err and f"pipeshift force-unlock {lock.id}" in err
    assert server.drains == []


def test_a_server_lost_while_following_is_a_line_and_a_failed_row(store_url, monkeypatch, capsys) -> None:
    FakeServer(monkeypatch)

    def gone(client, apply_id):
        raise AdminError("no pipeshift server answers at http://127.0.0.1:1 (Connection refused): start one")

    monkeypatch.setattr(AdminClient, "get_apply", gone)
    assert device(store_url, "drain", "worker-1") == 1
    out, err = capsys.readouterr()
    assert "lost the deployment while following apply apply-2-abcdef: no pipeshift server answers" in err
    assert "Traceback" not in out + err
    applied = [e for e in history(store_url, capsys) if e["type"] == "apply"]
    assert [(a["state"], a["outcome"]) for a in applied] == [("done", "failed")]


def test_a_drain_not_followed_is_recorded_and_the_next_refresh_fills_it_in(store_url, monkeypatch, capsys) -> None:
    server = FakeServer(monkeypatch)
    assert device(store_url, "drain", "worker-1", "--no-wait") == 0
    out = capsys.readouterr().out
    row_id = out.split("Recorded as ")[1].split(",")[0]
    (waiting,) = [e for e in history(store_url, capsys) if e["type"] == "apply"]
    assert (waiting["id"], waiting["state"], waiting["outcome"]) == (row_id, "detached", None)
    assert "--no-wait" in waiting["note"]
    # the server finished the drain; the next command that reads the deployment fills the row in
    server.get_apply("apply-2-abcdef")
    monkeypatch.setattr(AdminClient, "applies", lambda client: [{**DONE, "finished_at": None}])
    assert device(store_url, "add", "worker-1") == 0
    added = capsys.readouterr()
    # it was left to the server on purpose, not interrupted
    assert f"apply {row_id}, left to the server when its process" in added.out + added.err
    events = [e for e in history(store_url, capsys) if e["type"] != "device"]
    assert [(e["type"], e.get("outcome") or e.get("source")) for e in events] == [
        ("configuration", "observed"), ("apply", "applied"), ("configuration", "drain")]
    filled = events[1]
    assert (filled["state"], filled["to"]) == ("done", events[2]["id"])
    assert filled["note"].startswith("not followed (`pipeshift device drain --no-wait`); filled from the server")


def test_without_a_store_a_drain_says_it_is_not_recorded(tmp_path, monkeypatch, capsys) -> None:
    FakeServer(monkeypatch)
    assert device(f"sqlite:///{tmp_path / 'none.db'}", "drain", "worker-1") == 0
    assert "this drain is not recorded" in capsys.readouterr().err
