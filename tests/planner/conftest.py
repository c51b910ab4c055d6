from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SPECS = sorted((ROOT / "data/specs").glob("*.yaml"))


@pytest.fixture
def write_spec(tmp_path):
    """Returns a function that writes YAML text to a spec file and gives its path."""

    def _write(text: str, name: str = "spec.yaml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return _write


@pytest.fixture
def store_url(tmp_path: Path, capsys) -> str:
    """A new store made by `pipeshift init` (what it printed is read away)."""
    from planner.cli import main

    url = f"sqlite:///{tmp_path / 'store.db'}"
    assert main(["init", "--database-url", url]) == 0
    capsys.readouterr()
    return url

