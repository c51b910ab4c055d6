"""The planner REST API on a real `pipeshift serve --planner-api` (3 CPU workers, the real model)
over a real SQLite store: plan -> apply while clients stream -> the apply's row with its phases
and serving figures -> `pipeshift show --plot` of it -> rollback -> a stale plan refused (409);
every mutation without the token answers 401; schemathesis fuzzes the API from its own OpenAPI
document and nothing answers 5xx; `pipeshift planner` serves the same API alone and will not
listen beyond this host without a token."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from unittest import mock

import httpx
import pytest

from bench.serve_process import ServeProcess, free_port

pytestmark = pytest.mark.slow
pytest.importorskip("schemathesis")

TOKEN = "planner-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SPEC = {  # the local spec on three workers: the planner answers three full replicas
    "model": "SmolLM2-135M", "dtype": "fp32",
    "devices": [{"kind": "cpu", "count": 3, "node": "local"}],
    "workload": {"request_rate_per_s": 0.5, "prompt_tokens": {"mean": 128, "p99": 512},
                 "output_tokens": {"mean": 64, "p99": 256}, "batch": 4},
    "slo": {"ttft_ms": 5000, "tpot_ms": 1000}, "objective": "max_throughput",
}


def pipeshift(*args: str, env: dict[str, str], cwd: Path, check: int | None = 0) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "planner.cli", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env=env)
    if check is not None:
        assert done.returncode == check, f"{args}: {done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    directory = tmp_path_factory.mktemp("planner-api")
    env = {**os.environ, "PIPESHIFT_DATABASE_URL": f"sqlite:///{directory / 'store.db'}",
           "PIPESHIFT_API_TOKEN": TOKEN}
    pipeshift("init", env=env, cwd=directory)
    with mock.patch.dict(os.environ, env), ServeProcess("--devices", "3", "--stages", "0:30", "--planner-api") as server:
        yield f"{server.base_url}/planner", env, directory


def _wait_done(api: httpx.Client, apply_id: str, timeout_s: float = 240.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        row = api.get(f"/v1/applies/{apply_id}").json()
        if row["state"] != "running":
            return row
        time.sleep(0.2)
    raise TimeoutError(f"apply {apply_id} still running after {timeout_s} s")


def _stream(base_url: str, texts: list[str]) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{base_url}/v1", api_key="none")
    stream = client.completions.create(model="smollm2-135m", prompt="Once upon a time", max_tokens=120,
                                       temperature=0, stream=True, extra_body={"ignore_eos": True})
    texts.append("".join(chunk.choices[0].text for chunk in stream))


def test_plan_apply_show_rollback_and_stale(deployment):
    base, env, directory = deployment
    server = base.removesuffix("/planner")
    with httpx.Client(base_url=base, headers=AUTH, timeout=120) as api:
        planned = api.post("/v1/plans", json={"spec": SPEC})
        assert planned.status_code == 201, planned.text
        plan = planned.json()
        assert plan["has_changes"] and len(plan["target"]) == 3 and "Plan:" in plan["text"]
        assert api.get(f"/v1/plans/{plan['id']}").json()["id"] == plan["id"]

        texts: list[str] = []
        clients = [threading.Thread(target=_stream, args=(server, texts)) for _ in range(3)]
        for c in clients:
            c.start()
        time.sleep(3.0)  # the streams are under way when the apply begins
        started = api.post("/v1/applies", json={"plan_id": plan["id"], "max_overhead": 1.0})
        assert started.status_code == 202, started.text
        row = _wait_done(api, started.json()["apply"]["id"])
        for c in clients:
            c.join(120)
        assert row["outcome"] == "applied", row
        assert [p["name"] for p in row["phases"]] == ["prepare", "prefetch", "precopy", "switch", "cleanup"]
        windows = row["serving"]["windows"]
        assert windows["before"]["tokens"] > 0 and windows["during"]["tokens"] > 0
        assert len(row["serving"]["streams"]) == 3 and len(texts) == 3

        cluster = api.get("/v1/cluster").json()
        assert cluster["epoch"] == 2 and len(cluster["serving"]) == 3 and not cluster["drift"]
        configurations = api.get("/v1/configurations").json()["data"]
        assert [(c["serial"], c["source"]) for c in configurations] == [(1, "observed"), (2, "apply")]

        shown = pipeshift("show", row["id"], env=env, cwd=directory).stdout
        assert "switch" in shown and "before" in shown and "after" in shown
        pipeshift("show", row["id"], "--plot", "timeline.png", env=env, cwd=directory)
        assert (directory / "timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

        back = api.post("/v1/rollback", json={"configuration_id": configurations[0]["id"]})
        assert back.status_code == 202, back.text
        assert _wait_done(api, back.json()["apply"]["id"])["outcome"] == "applied"
        again = api.post("/v1/rollback", json={"configuration_id": configurations[0]["id"]})
        assert again.status_code == 200 and again.json()["apply"] is None  # nothing to change

        stale = api.post("/v1/applies", json={"plan_id": plan["id"]})
        assert stale.status_code == 409 and "stale" in stale.json()["detail"]
        assert api.get("/v1/applies/a-nothing").status_code == 404
        assert api.post("/v1/rollback", json={"configuration_id": 999}).status_code == 404
        bad = api.post("/v1/plans", json={"spec": {**SPEC, "devices": [{"kind": "cpu", "count": 0}]}})
        assert bad.status_code == 422 and "devices" in str(bad.json()["detail"][0]["loc"])
        two = api.post("/v1/plans", json={"spec": {**SPEC, "devices": [{"kind": "cpu", "count": 2}]}})
        assert two.status_code == 409 and "the server has 3" in two.json()["detail"]
        # the topology over the API: nodes (a host's shared cores) are taken, and checked
        local = {**SPEC, "devices": [{"kind": "cpu", "count": 3, "node": "box"}]}
        shared = api.post("/v1/plans", json={"spec": {**local, "nodes": [{"name": "box", "nic_gbps": 10, "cpu_cores": 1}]}})
        assert shared.status_code == 201, shared.text
        assert all(p["stages"][-1]["end"] == 30 for p in shared.json()["target"])
        unknown = api.post("/v1/plans", json={"spec": {**local, "nodes": [{"name": "other", "nic_gbps": 10}]}})
        assert unknown.status_code == 409 and "node 'box' is not in `nodes`" in unknown.json()["detail"]
        history = api.get("/v1/history").json()["data"]
        assert [e["source"] for e in history if e["type"] == "apply"] == ["apply", "rollback"]
        joined = [e["device"] for e in history if e["type"] == "device" and e["from"] is None]
        assert joined == ["worker-0", "worker-1", "worker-2"]


def test_every_mutation_needs_the_token(deployment):
    base, _, _ = deployment
    document = httpx.get(f"{base}/openapi.json").json()
    mutations = [path for path, operations in document["paths"].items() if "post" in operations]
    assert sorted(mutations) == ["/v1/applies", "/v1/plans", "/v1/rollback"]
    for path in mutations:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            answer = httpx.post(f"{base}{path}", json={}, headers=headers)
            assert answer.status_code == 401, (path, answer.text)
            assert answer.headers["www-authenticate"] == "Bearer"


def test_fuzz_no_server_errors(deployment):
    from tests.openapi_fuzz import fuzz_operations

    base = deployment[0]
    fuzzed = fuzz_operations(f"{base}/openapi.json", base, headers=AUTH, max_examples=15)
    assert len(fuzzed) == 8, fuzzed


def test_planner_alone(deployment, tmp_path):
    base, env, directory = deployment
    public = pipeshift("planner", "--host", "0.0.0.0", env={**env, "PIPESHIFT_API_TOKEN": ""}, cwd=tmp_path, check=2)
    assert "PIPESHIFT_API_TOKEN" in public.stderr
    port = free_port()
    alone = subprocess.Popen([sys.executable, "-m", "planner.cli", "planner", "--port", str(port), "--server",
                              base.removesuffix("/planner")], env=env, cwd=directory)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                cluster = httpx.get(f"http://127.0.0.1:{port}/v1/cluster", timeout=30).json()
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline and alone.poll() is None
                time.sleep(0.3)
        assert cluster["reachable"] and cluster["epoch"] >= 1 and len(cluster["devices"]) == 3
    finally:
        alone.terminate()
        alone.wait(30)
