"""Where a command writes (`simulate --plot DIR`, `show --plot FILE.png`, `examples --to DIR`)
cannot be written: a file where a folder should be, a folder that cannot be made. Each was an
OSError traceback (for simulate, after the whole simulation had run); each is one error line
naming the path and what to give instead."""

from __future__ import annotations

import pytest

from cost_models.paths import specs_dir
from planner.cli import main
from tests.store.recorded import store_with_one_apply

pytest.importorskip("matplotlib")


@pytest.fixture
def blocker(tmp_path):
    path = tmp_path / "a-file"
    path.write_text("")
    return path


def test_simulate_plot_into_a_file_says_it_takes_a_folder(capsys, blocker) -> None:
    spec = specs_dir() / "l4-a10g-mistral-7b-trace.yaml"
    trace = specs_dir() / "traces" / "chat-sample.csv"
    for target in (blocker, blocker / "plots"):
        code = main(["simulate", "-f", str(spec), "--trace", str(trace), "--duration", "5",
                     "--plot", str(target)])
        err = capsys.readouterr().err
        assert code == 1 and "Traceback" not in err
        assert f"pipeshift simulate: error: cannot make the folder {target} for --plot" in err
        assert "--plot takes a folder" in err


def test_show_plot_where_it_cannot_be_written_says_so(capsys, monkeypatch, tmp_path, blocker) -> None:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    apply_id = store_with_one_apply(url)
    target = blocker / "timeline.png"
    assert main(["show", apply_id, "--plot", str(target), "--database-url", url]) == 1
    err = capsys.readouterr().err
    assert f"pipeshift show: error: cannot write {target}" in err and "Traceback" not in err


def test_examples_to_a_folder_that_cannot_be_made_says_so(capsys, blocker) -> None:
    assert main(["examples", "local-cpu-smollm2", "--to", str(blocker / "specs")]) == 1
    err = capsys.readouterr().err
    assert "pipeshift examples: error: cannot write" in err and str(blocker) in err
    assert "choose another --to" in err and "Traceback" not in err
