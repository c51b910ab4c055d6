"""Logprobs, penalties and logit_bias through the official `openai` client against a real
`pipeshift serve` on 1 and 3 stages, checked against transformers' fp32 logits of the same
positions: the logprobs are its log-softmax within 1e-4, and with penalties and a bias the
server's tokens and logprobs are those of a reference computation of their formulas.
"""

from __future__ import annotations

import pytest
import torch

from bench.serve_process import ServeProcess

pytestmark = pytest.mark.slow
openai = pytest.importorskip("openai")

TOLERANCE = 1e-4
MAX_TOKENS = 6
TOP = 5


@pytest.fixture(scope="module")
def tokenizer(gguf_path):
    from agent.tokenizer import Tokenizer

    return Tokenizer.from_gguf(gguf_path)


@pytest.fixture(scope="module", params=[1, 3], ids=lambda n: f"{n}-stages")
def client(request):
    with ServeProcess("--devices", str(request.param)) as server:
        yield openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=300)


def reference(hf_model, prompt_ids: list[int], shape=lambda logits, output: logits) -> tuple[list[int], list[torch.Tensor]]:
    """Returns transformers' greedy tokens after `shape`(logits, output so far) and the
    log-softmax of the shaped logits at each generated position (float32)."""
    ids, logprobs = list(prompt_ids), []
    for _ in range(MAX_TOKENS):
        with torch.no_grad():
            logits = hf_model(torch.tensor([ids])).logits[0, -1].to(torch.float32)
        shaped = shape(logits, ids[len(prompt_ids):])
        logprobs.append(torch.log_softmax(shaped, dim=-1))
        ids.append(int(shaped.argmax()))
    return ids[len(prompt_ids):], logprobs


def test_chat_logprobs_are_transformers_log_softmax(client, hf_model, tokenizer):
    messages = [{"role": "user", "content": "Name three colors."}]
    answer = client.chat.completions.create(
        model="smollm2-135m", messages=messages, max_tokens=MAX_TOKENS, temperature=0,
        logprobs=True, top_logprobs=TOP, extra_body={"ignore_eos": True},
    )
    tokens, expected = reference(hf_model, tokenizer.encode_chat(messages))
    content = answer.choices[0].logprobs.content
    assert [c.token for c in content] == [tokenizer.token_text(t) for t in tokens]
    for c, token, lp in zip(content, tokens, expected, strict=True):
        assert abs(c.logprob - float(lp[token])) < TOLERANCE
        top = lp.topk(TOP)
        assert [t.token for t in c.top_logprobs] == [tokenizer.token_text(t) for t in top.indices.tolist()]
        assert max(abs(t.logprob - v) for t, v in zip(c.top_logprobs, top.values.tolist(), strict=True)) < TOLERANCE
        assert c.top_logprobs[0].logprob == c.logprob  # greedy: the same float32 number

    streamed = client.chat.completions.create(
        model="smollm2-135m", messages=messages, max_tokens=MAX_TOKENS, temperature=0,
        logprobs=True, stream=True, extra_body={"ignore_eos": True},
    )
    pieces = [c for chunk in streamed if chunk.choices and chunk.choices[0].logprobs
              for c in chunk.choices[0].logprobs.content]
    assert [(c.token, c.logprob) for c in pieces] == [(c.token, c.logprob) for c in content]


def test_penalties_and_logit_bias_change_the_distribution_as_their_formulas_say(client, hf_model, tokenizer):
    prompt_ids = tokenizer.encode("The cat sat on the mat. The cat sat on the")
    plain, _ = reference(hf_model, prompt_ids)
    bias = {plain[0]: -5.0, plain[1]: 2.5}
    presence, frequency, repetition = 0.4, 0.6, 1.3

    def shape(logits: torch.Tensor, output: list[int]) -> torch.Tensor:
        out = logits.clone()
        for t, b in bias.items():
            out[t] += b
        for t in set(prompt_ids) | set(output):
            out[t] = out[t] / repetition if out[t] > 0 else out[t] * repetition
        for t in set(output):
            out[t] -= frequency * output.count(t) + presence
        return out

    tokens, expected = reference(hf_model, prompt_ids, shape)
    assert tokens != plain  # the penalties matter for this prompt
    answer = client.completions.create(
        model="smollm2-135m", prompt=prompt_ids, max_tokens=MAX_TOKENS, temperature=0, logprobs=TOP,
        presence_penalty=presence, frequency_penalty=frequency, logit_bias={str(t): b for t, b in bias.items()},
        extra_body={"repetition_penalty": repetition, "ignore_eos": True},
    )
    logprobs = answer.choices[0].logprobs
    assert logprobs.tokens == [tokenizer.token_text(t) for t in tokens]
    for i, (token, lp) in enumerate(zip(tokens, expected, strict=True)):
        assert abs(logprobs.token_logprobs[i] - float(lp[token])) < TOLERANCE
        values, indices = lp.topk(TOP)
        for t, v in zip(indices.tolist(), values.tolist(), strict=True):
            assert abs(logprobs.top_logprobs[i][tokenizer.token_text(int(t))] - float(v)) < TOLERANCE
