"""`pipeshift plan --server` as a user types it: `--server host:port` without a scheme, and
`--json`, which printed the human diff instead of one JSON object. The admin API is answered
by canned replies (the live server is tests/integration/test_control_plane.py's)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from planner.admin_client import AdminClient, AdminError, server_url
from planner.cli import main

SPEC = """\
model: SmolLM2-135M
dtype: fp32
devices:
  - kind: cpu
    count: 2
workload:
  request_rate_per_s: 0.5
  prompt_tokens: 128
  output_tokens: 64
  batch: 4
objective: max_throughput
"""

DEPLOYMENT = {
    "model": "SmolLM2-135M",
    "epoch": 1,
    "configuration": {
        "pipelines": [
            {"stages": [{"device": "worker-0", "start": 0, "end": 15},
                        {"device": "worker-1", "start": 15, "end": 30}]}
        ]
    },
    "devices": [
        {"name": "worker-0", "kind": "cpu", "state": "serving"},
        {"name": "worker-1", "kind": "cpu", "state": "serving"},
    ],
}


@pytest.fixture
def answered(monkeypatch) -> list[str]:
    """Answers the admin API's deployment and dry run; returns the servers asked."""
    asked: list[str] = []

    def deployment(self: AdminClient) -> dict[str, Any]:
        asked.append(self.server)
        return DEPLOYMENT

    def plan(self: AdminClient, target: dict[str, Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
        return {"plan": {"has_changes": True, "target": target}, "text": "  ~ pipeline 0 ...",
                "feasible": True}

    monkeypatch.setattr(AdminClient, "deployment", deployment)
    monkeypatch.setattr(AdminClient, "plan", plan)
    return asked


def test_a_server_without_a_scheme_is_read_as_curl_reads_it() -> None:
    assert server_url("localhost:8000") == "http://localhost:8000"
    assert server_url("http://10.0.0.1:8000/") == "http://10.0.0.1:8000"
    assert server_url("https://pipes.example") == "https://pipes.example"
    # it said "unknown url type: localhost"; now it reaches for the server
    with pytest.raises(AdminError, match="no pipeshift server answers at http://127.0.0.1:1 "):
        AdminClient("127.0.0.1:1", timeout_s=5).deployment()


def test_plan_server_json_prints_one_json_object(capsys, tmp_path: Path, answered) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC)
    url = f"sqlite:///{tmp_path / 'store.db'}"
    assert main(["init", "--database-url", url]) == 0
    capsys.readouterr()
    out = tmp_path / "change.json"
    code = main(["plan", "-f", str(spec), "--server", "localhost:8000", "--json", "-out", str(out),
                 "--detailed-exitcode", "--database-url", url])
    captured = capsys.readouterr()
    assert code == 2, captured.err
    answer = json.loads(captured.out)
    assert answer["server"] == "http://localhost:8000" and answered == ["http://localhost:8000"]
    assert answer["feasible"] and answer["has_changes"] and answer["saved_to"] == str(out)
    assert answer["target"]["pipelines"] and answer["text"]
    assert json.loads(out.read_text())["server"] == "http://localhost:8000"


@pytest.mark.parametrize("backend", ["cpsat", "highs"])
def test_plan_server_plans_with_the_backend_asked(capsys, tmp_path: Path, answered, monkeypatch,
                                                  backend: str) -> None:
    """--backend was dropped against a server: the plan always came from CP-SAT."""
    import planner.operating_batch as operating_batch

    solve = operating_batch.plan_fitting_batch
    used: list[str] = []

    def spy(spec: Any, backend: str = "cpsat", time_limit_s: float = 10.0) -> Any:
        used.append(backend)
        return solve(spec, backend=backend, time_limit_s=time_limit_s)

    monkeypatch.setattr(operating_batch, "plan_fitting_batch", spy)
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC)
    url = f"sqlite:///{tmp_path / 'store.db'}"
    assert main(["init", "--database-url", url]) == 0
    capsys.readouterr()
    code = main(["plan", "-f", str(spec), "--server", "localhost:8000", "--backend", backend,
                 "--json", "--database-url", url])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert used == [backend] and json.loads(captured.out)["feasible"]
