"""Live reconfiguration of a real `pipeshift serve` while 8 requests stream through the official
`openai` client: 2 -> 3 -> 2 stages, a stage moved to a spare device, a replica gained and then
drained. Every text must equal the same request's text on the same deployment before any change.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from bench.serve_process import ServeProcess
from bench.streaming_load import prompt_token_ids, stream_completions
from planner.admin_client import AdminClient

pytestmark = pytest.mark.slow

PROMPT_LENGTHS = [128, 300, 500, 700, 900, 1200, 1600, 2000]
SECOND_WAVE_LENGTHS = [128, 256, 512, 160]
MAX_TOKENS = 160
# The second wave only has to outlast the drain of the replica it streams on (about a second).
SECOND_WAVE_MAX_TOKENS = 64
# Background copies may take a quarter of the time here (the default is 5 %): applies are
# shorter, so that the requests stream through all five; what is checked is the text.
MAX_OVERHEAD = 0.25
SERVE_ARGS = ("--devices", "5", "--stages", "0:15,15:30", "--kv-cache-mb", "512")


@pytest.fixture(scope="module")
def prompts(gguf_path):
    from agent.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_gguf(gguf_path)
    first = [prompt_token_ids(tokenizer, n, seed=i) for i, n in enumerate(PROMPT_LENGTHS)]
    second = [prompt_token_ids(tokenizer, n, seed=100 + i) for i, n in enumerate(SECOND_WAVE_LENGTHS)]
    return first, second


def _unchanged_texts(base_url: str, first: list, second: list) -> tuple[list[str], list[str]]:
    """Every request's text on the deployment as it starts, before any apply (both waves'
    requests at once)."""

    async def both() -> tuple[list, list]:
        return await asyncio.gather(stream_completions(base_url, first, MAX_TOKENS),
                                    stream_completions(base_url, second, SECOND_WAVE_MAX_TOKENS))

    a, b = asyncio.run(both())
    assert not any(s.error for s in a + b)
    return [s.text for s in a], [s.text for s in b]


def _apply(admin: AdminClient, target: dict, windows: list[tuple[float, float]]) -> dict:
    begin = time.monotonic()
    started = admin.apply(target, max_overhead=MAX_OVERHEAD)
    deadline = begin + 300
    while time.monotonic() < deadline:
        record = admin.get_apply(started["id"])
        if record["state"] == "done":
            windows.append((begin, time.monotonic()))
            return record
        time.sleep(0.1)
    raise TimeoutError(f"apply {started['id']} did not finish")


def _stages(deployment: dict) -> list[list[tuple[str, int, int]]]:
    return [[(s["device"], s["start"], s["end"]) for s in p["stages"]] for p in deployment["configuration"]["pipelines"]]


def _spares(deployment: dict) -> list[str]:
    return [d["name"] for d in deployment["devices"] if d["state"] == "spare"]


def _pipeline(stages: list[tuple[str, int, int]]) -> dict:
    return {"stages": [{"device": d, "start": s, "end": e} for d, s, e in stages]}


def test_requests_stream_through_every_transition_unchanged(prompts):
    first, second = prompts
    with ServeProcess(*SERVE_ARGS) as server:
        # The reference: the same server before it changes (no prefix cache: nothing carries over).
        expected_first, expected_second = _unchanged_texts(server.base_url, first, second)
        admin = AdminClient(server.base_url)
        streaming = threading.Event()
        wave_two: list = []
        applies: list[dict] = []
        windows: list[tuple[float, float]] = []

        def progress(streams) -> None:
            if all(len(s.times) >= 2 for s in streams):
                streaming.set()

        def reconfigure() -> None:
            assert streaming.wait(600), "the first wave never started streaming"
            applies.append(_apply(admin, {"stages": "0:10,10:20,20:30"}, windows))  # 2 -> 3
            applies.append(_apply(admin, {"stages": "0:15,15:30"}, windows))  # 3 -> 2
            deployment = admin.deployment()
            (p,) = _stages(deployment)
            spare = _spares(deployment)[0]
            moved = [p[0], (spare, p[1][1], p[1][2])]  # stage 1 to a spare device
            applies.append(_apply(admin, {"target": {"pipelines": [_pipeline(moved)]}}, windows))
            deployment = admin.deployment()
            a, b = _spares(deployment)[:2]
            replica = [(a, 0, 15), (b, 15, 30)]
            applies.append(_apply(admin, {"target": {"pipelines": [_pipeline(moved), _pipeline(replica)]}}, windows))
            # A second wave lands on the idle replica; the replica is drained while it streams.
            second_started = threading.Event()
            runner = threading.Thread(target=lambda: wave_two.extend(asyncio.run(stream_completions(
                server.base_url, second, SECOND_WAVE_MAX_TOKENS,
                on_progress=lambda s: second_started.set() if all(len(x.times) >= 2 for x in s) else None,
            ))))
            runner.start()
            assert second_started.wait(600), "the second wave never started streaming"
            on_replica = admin.deployment()["devices"]
            assert any(d["name"] == a and d["kv_blocks_reserved"] > 0 for d in on_replica), \
                "the second wave should have been routed to the idle replica"
            applies.append(_apply(admin, {"target": {"pipelines": [_pipeline(moved)]}}, windows))  # drain it
            runner.join()

        thread = threading.Thread(target=reconfigure)
        thread.start()
        streams = asyncio.run(stream_completions(server.base_url, first, MAX_TOKENS, on_progress=progress))
        thread.join()
        final = admin.deployment()

    assert [r["outcome"] for r in applies] == ["applied"] * 5, [r["error"] for r in applies]
    assert [r["epoch_to"] for r in applies] == [2, 3, 4, 5, 6]
    assert final["epoch"] == 6 and len(final["configuration"]["pipelines"]) == 1
    for stream, expected, n in zip(streams, expected_first, PROMPT_LENGTHS, strict=True):
        assert stream.error is None, stream.error
        assert stream.completion_tokens == MAX_TOKENS
        assert stream.text == expected, f"prompt of {n} tokens"
    for stream, expected in zip(wave_two, expected_second, strict=True):
        assert stream.error is None, stream.error
        assert stream.completion_tokens == SECOND_WAVE_MAX_TOKENS
        assert stream.text == expected
    # Requests really were moved while streaming: each apply's switch carried the requests of
    # the pipelines it changed (adding a replica moves none), and the tokens kept coming.
    moved = [next(p for p in r["phases"] if p["name"] == "switch").get("requests", 0) for r in applies]
    assert moved[:3] == [len(PROMPT_LENGTHS)] * 3 and moved[3] == 0
    assert moved[4] == len(SECOND_WAVE_LENGTHS)
    assert all(s.times[0] < windows[0][0] and s.times[-1] > windows[3][1] for s in streams)
    assert all(s.times[0] < windows[4][0] for s in wave_two)
    for record in (applies[0], applies[1], applies[2], applies[4]):
        assert record["measured"]["bytes_moved"] > 0
