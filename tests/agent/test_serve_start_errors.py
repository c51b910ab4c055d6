"""`pipeshift serve` when its workers cannot start what they were given (a --memory-budget
below a stage's weights): one line saying why, not the ControlError's traceback."""

from __future__ import annotations

import pytest

import agent.serve_command as serve_command
from agent.control import ControlError
from planner.cli import main


def test_a_worker_that_refuses_its_stage_is_an_error_message(capsys, monkeypatch) -> None:
    refusal = (
        "worker 0 failed 'configure': ValueError: layers 0-29 hold 542 MiB of weights and leave "
        "0 MiB for the KV pool, less than one block: raise --memory-budget or --kv-cache-mb"
    )

    def start_engine(args):
        raise ControlError(refusal)

    monkeypatch.setattr(serve_command, "start_engine", start_engine)
    assert main(["serve", "--memory-budget", "10", "--port", "0"]) == 1
    err = capsys.readouterr().err
    assert "pipeshift serve: error: the workers could not start:" in err
    assert "raise --memory-budget" in err and "Traceback" not in err


@pytest.mark.slow
def test_a_memory_budget_below_the_weights_stops_every_worker_and_says_so(capsys) -> None:
    assert main(["serve", "--memory-budget", "10", "--port", "0"]) == 1
    assert "raise --memory-budget" in capsys.readouterr().err


def test_a_failed_control_op_is_one_line_in_the_workers_log(caplog) -> None:
    """Each worker logged the refusal's whole traceback above the one-line error serve prints;
    now one line, and the traceback only at DEBUG (PIPESHIFT_LOG_LEVEL=DEBUG)."""
    import logging

    from agent.worker import Worker, reply_to

    worker = Worker(0, "cpu")
    with caplog.at_level(logging.INFO, logger="pipeshift.worker"):
        reply = reply_to(worker, {"id": 7, "op": "no_such_op"})
    assert reply == {"id": 7, "ok": False, "error": "ValueError: unknown control op 'no_such_op'"}
    assert [r.getMessage() for r in caplog.records] == [
        "control op no_such_op failed: ValueError: unknown control op 'no_such_op'"
    ]
    assert all(r.exc_info is None for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="pipeshift.worker"):
        reply_to(worker, {"id": 8, "op": "no_such_op"})
    assert any(r.exc_info for r in caplog.records)  # the traceback, when asked for
    assert reply_to(worker, {"id": 9, "op": "ping"})["ok"]
