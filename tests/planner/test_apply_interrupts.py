"""Ctrl-C in the CLI is a line that says what happened, never a traceback: at `apply`'s `yes`
prompt it cancels (nothing changed, the lock freed); before the apply starts nothing changes; a
second Ctrl-C while following stops following and names the apply the server goes on with; in
any other command it says `interrupted` and exits 130. The admin API is answered by canned
replies (the live server is tests/integration/test_control_plane.py's)."""

from __future__ import annotations

import builtins
from typing import Any

import pytest

from planner.admin_client import AdminClient
from planner.cli import main
from planner.store import open_store

DEPLOYMENT = {
    "model": "SmolLM2-135M",
    "epoch": 1,
    "configuration": {"pipelines": [{"stages": [{"device": "worker-0", "start": 0, "end": 15},
                                                {"device": "worker-1", "start": 15, "end": 30}]}]},
    "devices": [{"name": "worker-0", "kind": "cpu", "state": "serving"},
                {"name": "worker-1", "kind": "cpu", "state": "serving"},
                {"name": "worker-2", "kind": "cpu", "state": "spare"}],
}


def ctrl_c(*args: Any, **kwargs: Any) -> Any:
    raise KeyboardInterrupt


@pytest.fixture
def store_url(store_url: str, monkeypatch) -> str:
    monkeypatch.setattr(AdminClient, "deployment", lambda self: DEPLOYMENT)
    monkeypatch.setattr(AdminClient, "plan", lambda self, target, *a, **k: {
        "plan": {"has_changes": True}, "text": "  ~ pipeline 0 ...", "feasible": True})
    return store_url


def apply(url: str) -> int:
    return main(["apply", "--stages", "0:10,10:20,20:30", "--server", "127.0.0.1:1", "--database-url", url])


def locks(url: str) -> list:
    store = open_store(url)
    try:
        return store.locks()
    finally:
        store.close()


def test_ctrl_c_at_the_prompt_cancels_the_apply(store_url, monkeypatch, capsys) -> None:
    monkeypatch.setattr(builtins, "input", ctrl_c)
    monkeypatch.setattr(AdminClient, "apply", lambda *a, **k: pytest.fail("applied after a Ctrl-C"))
    assert apply(store_url) == 1
    out, err = capsys.readouterr()
    assert "Apply cancelled." in out and "Traceback" not in out + err
    assert locks(store_url) == []


def test_ctrl_c_before_the_apply_starts_changes_nothing(store_url, monkeypatch, capsys) -> None:
    monkeypatch.setattr(AdminClient, "deployment", ctrl_c)
    assert apply(store_url) == 1
    assert "Interrupted before the apply started: nothing was changed." in capsys.readouterr().err
    assert locks(store_url) == []


def test_a_second_ctrl_c_stops_following_and_names_the_apply(store_url, monkeypatch, capsys) -> None:
    monkeypatch.setattr(AdminClient, "apply", lambda *a, **k: {"id": "apply-7-abcdef"})
    monkeypatch.setattr("planner.apply_command.follow", ctrl_c)
    assert main(["apply", "--stages", "0:10,10:20,20:30", "--server", "127.0.0.1:1", "--auto-approve",
                 "--database-url", store_url]) == 1
    err = capsys.readouterr().err
    assert "Stopped following apply apply-7-abcdef; the server goes on with it" in err
    assert "GET /admin/v1/applies/apply-7-abcdef" in err
    assert locks(store_url) == []


def test_ctrl_c_in_any_command_is_one_line(monkeypatch, capsys) -> None:
    for call in ("deployment", "drain"):  # Ctrl-C at the first call to the server
        monkeypatch.setattr(AdminClient, call, ctrl_c)
    assert main(["device", "drain", "worker-1", "--server", "127.0.0.1:1"]) == 130
    out, err = capsys.readouterr()
    assert err.strip().splitlines()[-1] == "pipeshift device: interrupted"
    assert "Traceback" not in out + err
