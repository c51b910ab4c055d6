"""`pipeshift serve` and `pipeshift planner` on a port another process already holds: one line
saying so and what to do, before any worker starts; it was uvicorn's `[Errno 98] error while
attempting to bind` after the model had loaded on every worker and the server had printed the
address as its own (where the other process answered)."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

import agent.serve_command as serve_command
from agent.gateway.server import listening_socket
from planner.cli import main


@pytest.fixture
def taken_port() -> Iterator[int]:
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    yield holder.getsockname()[1]
    holder.close()


def test_serve_on_a_taken_port_says_so_before_starting_workers(capsys, monkeypatch, taken_port: int) -> None:
    def start_engine(args):
        raise AssertionError("the workers started although the port was taken")

    monkeypatch.setattr(serve_command, "start_engine", start_engine)
    assert main(["serve", "--port", str(taken_port)]) == 2
    err = capsys.readouterr().err
    assert f"pipeshift serve: error: cannot listen on 127.0.0.1:{taken_port}: the port is in use" in err
    assert "choose another --port" in err and "Traceback" not in err


def test_the_planner_api_on_a_taken_port_says_so(capsys, monkeypatch, tmp_path, taken_port: int) -> None:
    monkeypatch.setenv("PIPESHIFT_DATABASE_URL", f"sqlite:///{tmp_path / 'store.db'}")
    assert main(["init"]) == 0
    assert main(["planner", "--port", str(taken_port)]) == 1
    err = capsys.readouterr().err
    assert f"pipeshift planner: error: cannot listen on 127.0.0.1:{taken_port}: the port is in use" in err


def test_a_host_that_is_not_this_machines_is_named() -> None:
    with pytest.raises(ValueError, match="no-such-host.invalid.*give an address of this host"):
        listening_socket("no-such-host.invalid", 0)


def test_a_free_port_is_bound_for_the_server() -> None:
    sock = listening_socket("127.0.0.1", 0)
    try:
        assert sock.getsockname()[1] > 0
    finally:
        sock.close()


@pytest.mark.parametrize("port", ["99999", "-1"])
def test_a_port_outside_the_range_is_refused_not_wrapped(capsys, monkeypatch, port: str) -> None:
    # 99999 was bound as 34463 (99999 - 65536) and the server printed that address
    def start_engine(args):
        raise AssertionError("the workers started on a port the user did not give")

    monkeypatch.setattr(serve_command, "start_engine", start_engine)
    assert main(["serve", "--port", port]) == 2
    assert f"--port must be 0 to 65535, got {port}" in capsys.readouterr().err


@pytest.mark.parametrize("option", ["--max-batch-size", "--block-size", "--threads-per-worker"])
def test_a_count_below_one_is_refused_before_any_worker_starts(option: str) -> None:
    # --max-batch-size 0 started a server whose micro-batches could hold no request
    from planner.cli import build_parser

    args = build_parser().parse_args(["serve", option, "0"])
    with pytest.raises(ValueError, match=f"{option} must be at least 1, got 0"):
        serve_command.engine_config_from_args(args)


def test_a_server_that_took_the_port_while_this_one_started_is_said_too() -> None:
    # Two servers starting at once both bind (neither listens yet); the second to listen failed
    # with uvicorn's OSError traceback, after its workers had started.
    from fastapi import FastAPI

    from agent.gateway.server import run_server

    first = listening_socket("127.0.0.1", 0)
    port = first.getsockname()[1]
    second = listening_socket("127.0.0.1", port)
    try:
        first.listen()
        with pytest.raises(ValueError, match=f"cannot listen on 127.0.0.1:{port}: the port is in use"):
            run_server(FastAPI(), "127.0.0.1", port, log_level="warning", sock=second)
    finally:
        first.close()
        second.close()
