"""`pipeshift serve` driven by the official openai client: greedy completions identical to
transformers' generate, and bad input answered with what to fix.

One worker holds the whole model here; the multi-stage splits against transformers are in
test_openai_params.py (1 and 3 stages, logprobs within 1e-4) and the live tests (2 and 3
stages, texts unchanged across applies); every split's logits are in tests/agent.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from bench.serve_process import ServeProcess

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "def fibonacci(n):",
    "The three primary colors are",
    "To make a cup of tea, first",
    "Water boils at a temperature of",
    "The largest planet in our solar system is",
    "import numpy as np\n\n# compute the mean of",
]
MAX_TOKENS = 64


async def _stream_all(base_url: str) -> list[str]:
    openai = pytest.importorskip("openai")
    client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=600)

    async def one(prompt: str) -> str:
        stream = await client.completions.create(
            model="smollm2-135m", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stream=True
        )
        parts = []
        async for chunk in stream:
            parts.append(chunk.choices[0].text)
        return "".join(parts)

    try:
        return list(await asyncio.gather(*(one(p) for p in PROMPTS)))
    finally:
        await client.close()


@pytest.fixture(scope="module")
def transformers_texts(hf_model, gguf_path) -> list[str]:
    """transformers' greedy continuation of each prompt, from the same prompt token ids: all
    prompts in one batch, padded on the left and masked (as transformers batches generation)."""
    from agent.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_gguf(gguf_path)
    encoded = [tokenizer.encode(prompt) for prompt in PROMPTS]
    width = max(len(e) for e in encoded)
    pad = tokenizer.eos_token_id
    ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded])
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
    with torch.no_grad():
        out = hf_model.generate(
            ids, attention_mask=mask, max_new_tokens=MAX_TOKENS, do_sample=False,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=pad,
        )
    return [tokenizer.decode(row[width:].tolist(), skip_special_tokens=True) for row in out]


@pytest.fixture(scope="module")
def one_worker():
    """One `pipeshift serve --devices 1`, shared by the tests that do not change it."""
    with ServeProcess("--devices", "1") as server:
        yield server


def test_greedy_streams_match_transformers(transformers_texts, one_worker):
    texts = asyncio.run(_stream_all(one_worker.base_url))
    for prompt, got, expected in zip(PROMPTS, texts, transformers_texts, strict=True):
        assert got == expected, f"prompt {prompt!r}"
    assert all(len(t) > 20 for t in texts)


def test_bad_input_against_the_real_server(one_worker):
    """The real engine behind the gateway answers bad input with 400/404 saying what to fix."""
    import json
    import urllib.error
    import urllib.request

    def post(body: bytes) -> tuple[int, dict]:
        req = urllib.request.Request(
            f"{one_worker.base_url}/v1/completions", data=body, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def completion(**fields) -> tuple[int, dict]:
        return post(json.dumps({"model": "smollm2-135m", "prompt": "hi", **fields}).encode())

    long_prompt = "hello " * 9000  # > 8192 tokens
    status, body = completion(prompt=long_prompt, max_tokens=8)
    assert status == 400 and "context" in body["error"]["message"]
    status, body = completion(max_tokens=-3)
    assert status == 400 and body["error"]["param"] == "max_tokens"
    status, body = completion(max_tokens=10**9)
    assert status == 400 and "max_tokens" in body["error"]["message"]
    status, body = completion(max_tokens="ten")
    assert status == 400 and "max_tokens" in body["error"]["message"]
    status, body = post(b'{"model": "smollm2-135m", "prompt": ')
    assert status == 400 and "JSON" in body["error"]["message"]
    status, body = completion(model="gpt-17")
    assert status == 404 and "smollm2-135m" in body["error"]["message"].lower()
    status, body = completion(max_tokens=4, temperature=0)  # and it still serves
    assert status == 200 and body["usage"]["completion_tokens"] <= 4


def test_models_reports_the_longest_request_the_kv_cache_holds(one_worker):
    """`max_model_len` is what one request may have (prompt and output), as vLLM's: where the
    KV cache holds less than the context, the cache's size. It said the context (8192) while a
    worker holding the whole model holds 5,824 tokens, and such requests were refused."""
    import httpx

    with httpx.Client(base_url=one_worker.base_url, timeout=60) as client:
        longest = client.get("/v1/models").json()["data"][0]["max_model_len"]
        assert 0 < longest < 8192 and longest % 16 == 0  # whole KV blocks
        body = {"model": "smollm2-135m", "prompt": "hi", "max_tokens": 1}
        prompt_tokens = client.post("/v1/completions", json=body).json()["usage"]["prompt_tokens"]
        too_long = client.post("/v1/completions", json={**body, "max_tokens": longest - prompt_tokens + 1})
        assert too_long.status_code == 400, too_long.text
        # exactly the longest is admitted: its stream starts (and is closed after one event)
        with client.stream("POST", "/v1/completions",
                           json={**body, "max_tokens": longest - prompt_tokens, "stream": True}) as fits:
            assert fits.status_code == 200
            assert next(fits.iter_lines()).startswith("data: {")
