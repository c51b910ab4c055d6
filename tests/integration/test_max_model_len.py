"""`pipeshift serve --max-model-len`, as vLLM's option: requests are served in a context shorter
than the model's, so a request without max_tokens reserves KV for that many tokens, not for the
model's whole context."""

from __future__ import annotations

import httpx

from bench.serve_process import ServeProcess
from planner.cli import main


def test_a_length_above_the_models_context_is_refused_before_any_worker_starts(capsys) -> None:
    assert main(["serve", "--max-model-len", "9000", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "--max-model-len 9000 is not served: the model's context is 8192 tokens" in err
    assert "Traceback" not in err


def test_requests_are_served_within_the_length_given() -> None:
    with ServeProcess("--devices", "1", "--max-model-len", "128") as server, \
            httpx.Client(base_url=server.base_url, timeout=120) as client:
        assert client.get("/v1/models").json()["data"][0]["max_model_len"] == 128
        body = {"model": "smollm2-135m", "prompt": "The capital of France is", "max_tokens": 125}
        too_long = client.post("/v1/completions", json=body)
        assert too_long.status_code == 400 and "context is 128 tokens" in too_long.text
        # without max_tokens the answer may take what the 128 tokens leave, and no more
        chat = client.post("/v1/chat/completions", json={
            "model": "smollm2-135m", "messages": [{"role": "user", "content": "Count from 1 to 500."}]})
        assert chat.status_code == 200, chat.text
        usage = chat.json()["usage"]
        assert usage["prompt_tokens"] + usage["completion_tokens"] <= 128
