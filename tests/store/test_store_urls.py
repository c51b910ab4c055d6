"""A store URL a user mistypes, or whose driver is missing, and `show --plot` without
matplotlib: each is a message saying what to do, never a traceback."""

from __future__ import annotations

import importlib.util

import pytest

from planner.cli import main
from planner.store import NoStore, open_store
from tests.store.recorded import store_with_one_apply


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("nonsense", "is not a SQLAlchemy URL: give one such as sqlite:///"),
        ("foo://host/db", "names a database SQLAlchemy does not know (foo)"),
        ("mysql://user@host/db", "is not installed (MySQLdb)"),
    ],
)
def test_a_bad_store_url_says_what_a_store_url_looks_like(capsys, url, expected) -> None:
    # `nonsense` was an sqlalchemy ArgumentError traceback, `mysql://` a ModuleNotFoundError one
    if expected.startswith("is not installed") and importlib.util.find_spec("MySQLdb"):
        pytest.skip("this environment has the MySQL driver")
    with pytest.raises(NoStore, match=expected.replace("(", r"\(").replace(")", r"\)")):
        open_store(url)
    for command in ("history", "init"):
        assert main([command, "--database-url", url]) == 1
        err = capsys.readouterr().err
        assert f"pipeshift {command}: error:" in err and expected in err


def test_show_plot_without_matplotlib_says_what_to_install(capsys, monkeypatch, tmp_path) -> None:
    # It printed a ModuleNotFoundError traceback: the import it guarded did not import matplotlib.
    url = f"sqlite:///{tmp_path / 'store.db'}"
    apply_id = store_with_one_apply(url)
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a)
    )
    plot = tmp_path / "timeline.png"
    assert main(["show", apply_id, "--plot", str(plot), "--database-url", url]) == 1
    assert "pip install 'pipeshift[plot]'" in capsys.readouterr().err
    assert not plot.exists()


@pytest.mark.parametrize("through", ["--database-url", "XDG_DATA_HOME"])
def test_a_store_folder_that_cannot_be_made_says_so(capsys, monkeypatch, tmp_path, through) -> None:
    # It was a FileNotFoundError / NotADirectoryError traceback out of mkdir.
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    args = []
    if through == "XDG_DATA_HOME":
        monkeypatch.delenv("PIPESHIFT_DATABASE_URL", raising=False)
        monkeypatch.setenv("XDG_DATA_HOME", str(blocker / "share"))
    else:
        args = ["--database-url", f"sqlite:///{blocker / 'sub' / 'store.db'}"]
    assert main(["init", *args]) == 1
    err = capsys.readouterr().err
    assert "pipeshift init: error: cannot make the folder" in err
    assert str(blocker) in err and "PIPESHIFT_DATABASE_URL" in err and "Traceback" not in err
    assert main(["history", *args]) == 1
    assert "run `pipeshift init`" in capsys.readouterr().err
