"""Logprobs, penalties and logit_bias through the official `openai` client against a real
`pipeshift serve` on 1 and 3 stages, checked against transformers' fp32 logits of the same
positions: the logprobs are its log-softmax within 1e-4, and with penalties and a bias the
server's tokens and logprobs are those of a reference computation of their formulas. Echo
returns the prompt's logprobs (as lm-evaluation-harness asks for them), a batch of prompts one
choice each in order, and n choices whose prompt was prefilled once (/metrics says so).
"""

from __future__ import annotations

import pytest
import torch

from bench.serve_process import ServeProcess
from tests.integration.json_output import (  # noqa: F401  response_format, on these servers
    test_a_bad_response_format_is_a_400_naming_the_problem,
    test_a_short_max_tokens_may_cut_the_json,
    test_completions_take_a_response_format_too,
    test_json_object_answers_parse,
    test_json_schema_answers_parse_and_validate,
    test_the_clients_own_structured_outputs_parse,
)

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


def reference(hf_model, prompt_ids: list[int], shape=lambda logits, output: logits,
              n_tokens: int = MAX_TOKENS) -> tuple[list[int], list[torch.Tensor]]:
    """Returns transformers' greedy tokens after `shape`(logits, output so far) and the
    log-softmax of the shaped logits at each generated position (float32)."""
    ids, logprobs = list(prompt_ids), []
    for _ in range(n_tokens):
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


_GREEDY: dict[tuple[int, ...], list[int]] = {}


def greedy_tokens(hf_model, prompt_ids: list[int], n_tokens: int = MAX_TOKENS) -> list[int]:
    """Returns transformers' greedy tokens of `prompt_ids`, computed once for both servers."""
    key = (n_tokens, *prompt_ids)
    if key not in _GREEDY:
        _GREEDY[key] = reference(hf_model, prompt_ids, n_tokens=n_tokens)[0]
    return _GREEDY[key]


def prefill_tokens(client) -> float:
    """Returns the engine's count of prompt positions computed, read from /metrics."""
    import urllib.request

    url = str(client.base_url).removesuffix("/v1/").removesuffix("/v1") + "/metrics"
    with urllib.request.urlopen(url) as answer:
        for line in answer.read().decode().splitlines():
            if line.startswith('pipeshift_engine_stat{key="prefill_tokens"}'):
                return float(line.split()[-1])
    raise AssertionError("no prefill_tokens on /metrics")


def test_echo_returns_the_prompts_logprobs_as_transformers_log_softmax(client, hf_model, tokenizer):
    # What lm-evaluation-harness's local-completions sends for loglikelihoods: token-id
    # prompts in a batch, echo, one logprob, one token.
    prompts = [tokenizer.encode("The capital of France is Paris"), tokenizer.encode("Two plus two is four")]
    answer = client.completions.create(
        model="smollm2-135m", prompt=prompts, echo=True, logprobs=1, max_tokens=1, temperature=0,
    )
    assert [c.index for c in answer.choices] == [0, 1]
    for ids, choice in zip(prompts, answer.choices, strict=True):
        with torch.no_grad():
            expected = torch.log_softmax(hf_model(torch.tensor([ids])).logits[0].to(torch.float32), dim=-1)
        lp = choice.logprobs
        assert len(lp.tokens) == len(ids) + 1  # every prompt token, then the generated one
        assert lp.tokens[:len(ids)] == [tokenizer.token_text(t) for t in ids]
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        for pos in range(1, len(ids)):
            assert abs(lp.token_logprobs[pos] - float(expected[pos - 1, ids[pos]])) < TOLERANCE
            best = int(expected[pos - 1].argmax())
            assert abs(lp.top_logprobs[pos][tokenizer.token_text(best)] - float(expected[pos - 1, best])) < TOLERANCE
        generated = int(expected[-1].argmax())
        assert lp.tokens[-1] == tokenizer.token_text(generated)
        assert abs(lp.token_logprobs[-1] - float(expected[-1, generated])) < TOLERANCE
        assert choice.text.startswith(tokenizer.decode(ids))

    # max_tokens 0: the prompt alone, as vLLM answers it.
    alone = client.completions.create(
        model="smollm2-135m", prompt=prompts[0], echo=True, logprobs=0, max_tokens=0,
    )
    lp = alone.choices[0].logprobs
    assert alone.choices[0].text == tokenizer.decode(prompts[0])
    assert lp.token_logprobs == answer.choices[0].logprobs.token_logprobs[:-1]


def test_a_batch_of_prompts_answers_one_choice_each_in_order(client, hf_model, tokenizer):
    texts = ["The capital of France is", "One, two, three,", "Water is made of", "The cat sat on the"]
    answer = client.completions.create(model="smollm2-135m", prompt=texts, max_tokens=3,
                                       temperature=0, extra_body={"ignore_eos": True})
    assert [c.index for c in answer.choices] == [0, 1, 2, 3]
    for text, choice in zip(texts, answer.choices, strict=True):
        assert choice.text == tokenizer.decode(greedy_tokens(hf_model, tokenizer.encode(text), 3))
    assert answer.usage.prompt_tokens == sum(len(tokenizer.encode(t)) for t in texts)
    assert answer.usage.completion_tokens == 4 * 3


def test_n_choices_share_one_prefill(client, hf_model, tokenizer):
    prompt = "Write a list of three fruits:"
    prompt_ids = tokenizer.encode(prompt)
    before = prefill_tokens(client)
    answer = client.completions.create(model="smollm2-135m", prompt=prompt, n=3, max_tokens=MAX_TOKENS,
                                       temperature=0, extra_body={"ignore_eos": True})
    assert prefill_tokens(client) - before == len(prompt_ids)  # once, not three times
    assert [c.index for c in answer.choices] == [0, 1, 2]
    tokens = greedy_tokens(hf_model, prompt_ids)
    assert {c.text for c in answer.choices} == {tokenizer.decode(tokens)}  # greedy members are one
    assert answer.usage.completion_tokens == 3 * MAX_TOKENS

    # Sampled with a seed: each member its own, reproducible stream; streamed by index.
    def sampled(stream: bool) -> list[str]:
        kwargs = dict(model="smollm2-135m", messages=[{"role": "user", "content": "Say a word."}], n=3,
                      max_tokens=3, temperature=1.0, seed=7, extra_body={"ignore_eos": True})
        if not stream:
            return [c.message.content for c in client.chat.completions.create(**kwargs).choices]
        texts = [""] * 3
        for chunk in client.chat.completions.create(stream=True, **kwargs):
            for c in chunk.choices:
                texts[c.index] += c.delta.content or ""
        return texts

    whole = sampled(stream=False)
    assert sampled(stream=True) == whole
    assert len(set(whole)) > 1
