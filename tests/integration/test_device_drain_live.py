"""Devices leave and join a real `pipeshift serve` while requests stream, and the workload
monitor and the controller (propose mode) report on the same server.

One server (3 CPU workers, 2 stages, one spare): the same greedy requests stream once on the
unchanged deployment and once while `pipeshift device drain` moves a stage to the spare and
then merges the next drained device's layers into its neighbour; every text must be the same.
Then `pipeshift device add worker-3` starts a fourth worker on the running server and an apply
moves a stage onto it while the requests stream again, with the same texts.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from bench.serve_process import ServeProcess
from bench.streaming_load import prompt_token_ids, stream_completions
from planner.admin_client import AdminClient, AdminError

pytestmark = pytest.mark.slow

LOCAL_SPEC = Path(__file__).resolve().parents[2] / "data" / "specs" / "local-cpu-smollm2.yaml"
PROMPT_LENGTHS = [48, 96, 128, 64]
MAX_TOKENS = 64  # long enough that they still stream when the drain (now recorded in the store first) switches
ADDED_MAX_TOKENS = 64  # the new worker loads half the model while these stream
SERVE_ARGS = ("--devices", "3", "--stages", "0:15,15:30", "--kv-cache-mb", "64", "--max-overhead", "0.5",
              "--controller", "propose", "--controller-interval", "1", "--workload-window", "120")


@pytest.fixture(scope="module")
def store_url(tmp_path_factory) -> str:
    """The server's own store (`--planner-api`): the controller writes its decisions there."""
    from planner.store import init_schema

    url = f"sqlite:///{tmp_path_factory.mktemp('drain-store') / 'store.db'}"
    init_schema(url)
    return url


@pytest.fixture(scope="module")
def server(store_url):
    with ServeProcess(*SERVE_ARGS, "--planner-api", "--database-url", store_url) as served:
        yield served


@pytest.fixture(scope="module")
def prompts(gguf_path):
    from agent.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_gguf(gguf_path)
    return [prompt_token_ids(tokenizer, n, seed=40 + i) for i, n in enumerate(PROMPT_LENGTHS)]


def device(args: list[str], server: ServeProcess, store_url: str | None = None) -> subprocess.CompletedProcess:
    stored = ["--database-url", store_url] if store_url else []
    return subprocess.run([sys.executable, "-m", "planner.cli", "device", *args, "--server", server.base_url, *stored],
                          capture_output=True, text=True, timeout=120)


def history(store_url: str) -> list[dict]:
    done = subprocess.run([sys.executable, "-m", "planner.cli", "history", "--decisions", "--json",
                           "--database-url", store_url], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def states(admin: AdminClient) -> dict[str, str]:
    return {d["name"]: d["state"] for d in admin.deployment()["devices"]}


def switched_at(record: dict) -> float:
    """Returns when an apply's switch ended, on this process's monotonic clock (the streams')."""
    switch = next(p for p in record["phases"] if p["name"] == "switch")
    return switch["ended_at"] - (time.time() - time.monotonic())


def stream_while(server: ServeProcess, prompts, max_tokens: int, action) -> list:
    """Streams `prompts` and runs `action` on a thread once every stream has two tokens;
    returns the streams when both are done."""
    streaming = threading.Event()

    def act() -> None:
        assert streaming.wait(120), "the requests never started streaming"
        action()

    thread = threading.Thread(target=act)
    thread.start()
    streams = asyncio.run(stream_completions(
        server.base_url, prompts, max_tokens,
        on_progress=lambda s: streaming.set() if all(len(x.times) >= 2 for x in s) else None))
    thread.join()
    return streams


def test_drain_moves_layers_live_and_texts_stay_the_same(server, prompts, tmp_path, store_url):
    admin = AdminClient(server.base_url)
    unchanged = asyncio.run(stream_completions(server.base_url, prompts, MAX_TOKENS))
    assert not any(s.error for s in unchanged)

    drains: list[subprocess.CompletedProcess] = []
    configurations: list[dict] = []
    drained: list[float] = []
    outcomes: list[str] = []

    def drain() -> None:
        drains.append(device(["drain", "worker-1"], server, store_url))  # a spare takes its stage
        apply_id = re.search(r"\(apply (\S+?),", drains[-1].stdout)
        drained.append(switched_at(admin.get_apply(apply_id[1])) if apply_id else float("inf"))
        configurations.append(admin.deployment()["configuration"])
        second = admin.drain("worker-2")  # no spare left: worker-0 takes 0-29
        outcomes.append(admin.wait(second["apply"]["id"])["outcome"])
        configurations.append(admin.deployment()["configuration"])

    streams = stream_while(server, prompts, MAX_TOKENS, drain)

    assert drains[0].returncode == 0 and "worker-1 is drained" in drains[0].stdout, drains[0].stderr
    assert outcomes == ["applied"]
    assert configurations[0] == {"pipelines": [{"stages": [
        {"device": "worker-0", "start": 0, "end": 15}, {"device": "worker-2", "start": 15, "end": 30}]}]}
    assert configurations[1] == {"pipelines": [{"stages": [{"device": "worker-0", "start": 0, "end": 30}]}]}
    assert not any(s.error for s in streams), [s.error for s in streams]
    assert [s.text for s in streams] == [s.text for s in unchanged]
    assert all(s.completion_tokens == MAX_TOKENS for s in streams)
    # the drain ran while the requests streamed: tokens came before and after its switch
    assert all(min(s.times) < drained[0] for s in streams) and max(s.times[-1] for s in streams) > drained[0]
    assert states(admin) == {"worker-0": "serving", "worker-1": "drained", "worker-2": "drained"}

    # a drained device is left alone until it is added back
    with pytest.raises(AdminError, match="drained: add it back first") as refused:
        admin.apply({"target": {"pipelines": [{"stages": [
            {"device": "worker-0", "start": 0, "end": 15}, {"device": "worker-1", "start": 15, "end": 30}]}]}})
    assert refused.value.status == 400
    # ... also by a target that names no device: its stages go to available devices only
    with pytest.raises(AdminError, match=r"2 stages and there is 1 device.*\(worker-1, worker-2 drained") \
            as refused:
        admin.plan({"stages": "0:15,15:30"})
    assert refused.value.status == 400
    for name, status, says in (("worker-0", 409, "only device serving"), ("worker-9", 404, "no device 'worker-9'")):
        with pytest.raises(AdminError, match=says) as refused:
            admin.drain(name)
        assert refused.value.status == status
    # a plan from a spec leaves drained devices out, and says so when the spec counts them
    from planner.operations import OperationError, plan_change
    from planner.spec import load_spec
    from planner.store import init_schema, open_store

    url = f"sqlite:///{tmp_path / 'store.db'}"
    init_schema(url)
    store = open_store(url)
    try:
        with pytest.raises(OperationError, match="left out: worker-1 drained, worker-2 drained") as refused:
            plan_change(store, admin, load_spec(LOCAL_SPEC), time_limit_s=10)  # 4 devices
        assert refused.value.status == 409
        one = tmp_path / "one.yaml"
        one.write_text(LOCAL_SPEC.read_text().replace("count: 4", "count: 1"))
        change = plan_change(store, admin, load_spec(one), time_limit_s=10)
        assert {s.device for p in change.target.pipelines for s in p.stages} == {"worker-0"}
    finally:
        store.close()

    added = device(["add", "worker-1"], server, store_url)
    assert added.returncode == 0 and "worker-1 is available again" in added.stdout
    assert states(admin)["worker-1"] == "spare"
    # the server's store (the same one the drain was recorded in) saw each change of the fleet
    changes = [(e["device"], e["from"], e["to"]) for e in history(store_url) if e["type"] == "device"]
    for change in (("worker-1", "serving", "drained"), ("worker-2", "spare", "serving"),
                   ("worker-1", "drained", "spare")):
        assert change in changes, changes
    drain_rows = [e for e in history(store_url) if e["type"] == "apply" and e["source"] == "drain"]
    assert [e["outcome"] for e in drain_rows] == ["applied"]


def test_a_device_added_while_serving_takes_a_stage_live(server, prompts):
    """`pipeshift device add worker-3` starts a fourth worker on the running server; an apply
    then moves the second stage onto it while requests stream, and the texts stay the greedy
    ones; a drain takes it out again like any device."""
    admin = AdminClient(server.base_url)
    reference = asyncio.run(stream_completions(server.base_url, prompts, ADDED_MAX_TOKENS))
    assert not any(s.error for s in reference)

    began = time.monotonic()
    added = device(["add", "worker-3"], server)
    add_s = time.monotonic() - began
    assert added.returncode == 0 and "worker-3 is up" in added.stdout, added.stderr
    new = {d["name"]: d for d in admin.deployment()["devices"]}["worker-3"]
    assert new["state"] == "spare" and new["held_layers"] == [] and new["pid"] > 0 and new["kv_blocks"] >= 1
    assert add_s < 60, f"adding a worker took {add_s:.1f} s"

    # refusals are 4xx that say what to do, and start nothing
    for body, status, says in (({"device": "worker-3"}, 409, "worker-3 is in this deployment already"),
                               ({"device": "gpu-0"}, 400, "devices are named worker-N"),
                               ({"device": "worker-4", "kind": "cuda"}, 400, "cannot start a device of kind 'cuda'")):
        with pytest.raises(AdminError, match=says) as refused:
            admin.add_device(**body)
        assert refused.value.status == status, body
    bad = device(["add", "worker-4", "--kind", "cuda"], server)
    assert bad.returncode == 2 and "its workers are cpu workers" in bad.stderr
    assert "worker-4" not in states(admin)

    target = [{"device": "worker-0", "start": 0, "end": 15}, {"device": "worker-3", "start": 15, "end": 30}]
    outcomes: list[dict] = []
    ended: list[float] = []

    def place() -> None:
        started = admin.apply({"target": {"pipelines": [{"stages": target}]}})
        outcomes.append(admin.wait(started["id"]))
        ended.append(switched_at(outcomes[-1]))

    streams = stream_while(server, prompts, ADDED_MAX_TOKENS, place)

    assert outcomes and outcomes[0]["outcome"] == "applied", outcomes
    assert admin.deployment()["configuration"] == {"pipelines": [{"stages": target}]}
    assert not any(s.error for s in streams), [s.error for s in streams]
    assert [s.text for s in streams] == [s.text for s in reference]
    assert all(s.completion_tokens == ADDED_MAX_TOKENS for s in streams)
    # the apply ran while the requests streamed: tokens came before and after its switch
    assert all(min(s.times) < ended[0] for s in streams) and max(s.times[-1] for s in streams) > ended[0]
    assert states(admin)["worker-3"] == "serving"

    drained = admin.drain("worker-3")  # a spare takes its stage, as from any device
    assert admin.wait(drained["apply"]["id"])["outcome"] == "applied"
    assert states(admin)["worker-3"] == "drained"
    assert "worker-3" not in {s["device"] for p in admin.deployment()["configuration"]["pipelines"]
                              for s in p["stages"]}


def test_the_workload_window_and_the_controller_report(server, prompts, store_url):
    admin = AdminClient(server.base_url)
    if admin.workload()["arrivals"] < 5:  # this test alone: give the monitor something to see
        asyncio.run(stream_completions(server.base_url, prompts + prompts, 8))
    workload = admin.deployment()["workload"]
    assert workload["arrivals"] >= 5 and workload["arrival_rate_per_s"] > 0
    assert workload["prompt_tokens"]["p90"] >= 96 and workload["output_tokens"]["mean"] >= 8
    assert 0 <= workload["slo_attainment"] <= 1 and workload["kv_use"]["max"] > 0
    assert workload["pipelines"] and all(p["ttft_s"]["p50"] > 0 for p in workload["pipelines"].values())
    with urllib.request.urlopen(f"{server.base_url}/metrics") as answer:
        metrics = answer.read().decode()
    assert "pipeshift_workload_arrival_rate " in metrics
    assert 'pipeshift_workload_slo_attainment{pipeline="all",slo="all"}' in metrics

    deadline = time.monotonic() + 20
    while not (controller := admin.controller())["decisions"] and time.monotonic() < deadline:
        time.sleep(0.5)
    assert controller["mode"] == "propose" and controller["running"]
    decision = controller["decisions"][-1]
    assert decision["reason"] and decision["mode"] == "propose" and decision["apply_id"] is None
    assert {"goodput_current_rps", "goodput_target_rps", "stall_ms", "payback_s"} <= set(decision["predicted"])
    assert decision["workload"]["rate_per_s"] > 0

    # every decision, acting or not, is in the server's store too (written before it is listed)
    shown = {d["id"]: d for d in admin.controller()["decisions"]}
    stored = {e["serial"]: e for e in history(store_url) if e["type"] == "decision"}
    assert shown and set(shown) <= set(stored)
    assert all((stored[i]["act"], stored[i]["reason"], stored[i]["predicted"]) ==
               (d["act"], d["reason"], d["predicted"]) for i, d in shown.items())
