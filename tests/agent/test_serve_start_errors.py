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
