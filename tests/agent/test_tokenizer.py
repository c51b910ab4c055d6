"""agent.tokenizer against transformers' tokenizer for the same GGUF file.

`gguf_path` and `hf_tokenizer` (transformers, loaded once per session) come from tests/conftest.py.
"""

from __future__ import annotations

import jinja2
import pytest

from agent.tokenizer import Tokenizer

TRICKY = [
    "",
    "1234567",
    "3.14159",
    "2026-11-26",
    "pi is 3.14159, not 22/7",
    "👨‍👩‍👧",
    "🙂",
    "I feel 🙂 today 👨‍👩‍👧!",
    "日本語のテキスト 中文 한국어",
    "Café naïve résumé Ångström",
    "a   b\t\tc\n\n\nd",
    "   leading spaces",
    "trailing spaces   ",
    " ",
    "def f(x):\n    return x ** 2  # square\n",
    "<|im_start|>user\nhi<|im_end|>",
    "text<|endoftext|>more<|im_end|>\n",
    "I'm sure they'll say it's fine, don't you?",
]

# Whitespace before a digit: SmolLM2's own tokenizer.json and llama.cpp isolate digits first
# (Digits + ByteLevel), transformers' GGUF loader does not. Pinned as token strings.
DIGIT_AFTER_SPACES = {
    "a  1": ["a", "ĠĠ", "1"],
    "\n\n1. one\n\n2. two": ["ĊĊ", "1", ".", "Ġone", "ĊĊ", "2", ".", "Ġtwo"],
    "x   2024": ["x", "ĠĠĠ", "2", "0", "2", "4"],
}


@pytest.fixture(scope="module")
def tok(gguf_path) -> Tokenizer:
    return Tokenizer.from_gguf(gguf_path)


def test_metadata(tok, hf_tokenizer):
    assert tok.vocab_size == len(hf_tokenizer) == 49152
    assert tok.bos_token_id == hf_tokenizer.bos_token_id == 1
    assert tok.eos_token_id == hf_tokenizer.eos_token_id == 2
    assert tok.pad_token_id == hf_tokenizer.pad_token_id
    assert tok.token_text(tok.eos_token_id) == "<|im_end|>"
    assert tok.add_bos_token is False  # the file says so: encode adds nothing


@pytest.mark.parametrize("text", TRICKY)
def test_encode_matches_transformers(tok, hf_tokenizer, text):
    assert tok.encode(text) == hf_tokenizer.encode(text)
    assert tok.encode(text, add_special_tokens=False) == hf_tokenizer.encode(
        text, add_special_tokens=False
    )


def test_special_tokens_in_text_map_to_their_ids(tok):
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert len(ids) == 5  # <|im_start|> user \n hi <|im_end|>


def test_digits_are_split_individually(tok):
    assert tok.encode("1234567") == [tok.backend.token_to_id(d) for d in "1234567"]


@pytest.mark.parametrize("text", sorted(DIGIT_AFTER_SPACES))
def test_digit_after_whitespace_follows_the_model_tokenizer(tok, text):
    want = [tok.backend.token_to_id(t) for t in DIGIT_AFTER_SPACES[text]]
    assert None not in want
    assert tok.encode(text) == want


def test_transformers_compatible_split_matches_transformers_everywhere(
    tok, gguf_path, hf_tokenizer
):
    # Without the digit split our build is transformers' own, including where the default differs.
    compat = Tokenizer.from_gguf(gguf_path, digit_split=False)
    for text in [*TRICKY, *DIGIT_AFTER_SPACES]:
        assert compat.encode(text) == hf_tokenizer.encode(text), text
    assert compat.encode("a  1") != tok.encode("a  1")


@pytest.mark.parametrize("text", TRICKY)
@pytest.mark.parametrize("skip", [False, True])
def test_decode_matches_transformers_and_round_trips(tok, hf_tokenizer, text, skip):
    ids = tok.encode(text)
    assert tok.decode(ids, skip_special_tokens=skip) == hf_tokenizer.decode(
        ids, skip_special_tokens=skip
    )
    if not skip:
        assert tok.decode(ids) == text


def test_decode_skips_special_tokens(tok):
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi"


CONVERSATIONS = {
    "system+user": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2? 🙂"},
    ],
    "user-only": [{"role": "user", "content": "Hello!\nHow are you?"}],
    "multi-turn": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "bye"},
    ],
}


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("gen", [True, False])
def test_chat_template_matches_transformers(tok, hf_tokenizer, name, gen):
    messages = CONVERSATIONS[name]
    want = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    assert tok.apply_chat_template(messages, add_generation_prompt=gen) == want
    assert tok.encode_chat(messages, add_generation_prompt=gen) == hf_tokenizer.encode(
        want, add_special_tokens=False
    )


def test_chat_template_text(tok):
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text.startswith("<|im_start|>system\n")  # the template's default system prompt
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_template_environment_matches_transformers(tok, hf_tokenizer):
    # trim_blocks / lstrip_blocks change the output of an indented template.
    template = (
        "{% for m in messages %}\n"
        "    {% if m['role'] == 'user' %}\n"
        "U: {{ m['content'] }}\n"
        "    {% endif %}\n"
        "{% endfor %}{{ bos_token }}{{ eos_token }}"
    )
    messages = CONVERSATIONS["multi-turn"]
    custom = Tokenizer(tok.backend, tok.special, chat_template=template)
    want = hf_tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)
    assert custom.apply_chat_template(messages) == want


def test_template_raise_exception_and_sandbox(tok):
    raising = Tokenizer(tok.backend, tok.special, chat_template="{{ raise_exception('no tools') }}")
    with pytest.raises(jinja2.TemplateError, match="no tools"):
        raising.apply_chat_template([{"role": "user", "content": "x"}])
    mutating = Tokenizer(tok.backend, tok.special, chat_template="{{ messages.append(1) }}")
    with pytest.raises(jinja2.exceptions.SecurityError):
        mutating.apply_chat_template([{"role": "user", "content": "x"}])


def stream_all(tok: Tokenizer, ids: list[int], skip: bool = True) -> list[str]:
    stream = tok.detokenize_stream(skip_special_tokens=skip)
    return [stream.push(i) for i in ids] + [stream.flush()]


EMOJI_TEXT = "Family: 👨‍👩‍👧, mood 🙂🙂 — 日本語 café 🎉!"


@pytest.mark.parametrize("text", [EMOJI_TEXT, *TRICKY])
@pytest.mark.parametrize("skip", [False, True])
def test_stream_deltas_concatenate_to_decode(tok, text, skip):
    ids = tok.encode(text)
    assert "".join(stream_all(tok, ids, skip)) == tok.decode(ids, skip_special_tokens=skip)


def test_stream_never_emits_half_a_character(tok):
    ids = tok.encode(EMOJI_TEXT)
    deltas = stream_all(tok, ids)
    assert not any("\ufffd" in d for d in deltas)
    # A lone emoji token decodes to U+FFFD, so some pushes must hold back.
    assert any(tok.decode([i]).endswith("\ufffd") for i in ids)
    assert "" in deltas[:-1]


def test_stream_holds_back_until_the_character_completes(tok):
    ids = tok.encode("🙂")
    assert len(ids) >= 2
    stream = tok.detokenize_stream()
    assert [stream.push(i) for i in ids] == [""] * (len(ids) - 1) + ["🙂"]


def test_stream_flushes_invalid_utf8_like_decode(tok):
    # A lead byte of a 4-byte character with nothing after it never completes.
    emoji = tok.encode("🙂")
    ids = tok.encode("ok ") + emoji[:1]
    deltas = stream_all(tok, ids)
    assert deltas[-1].endswith("\ufffd")
    assert "".join(deltas) == tok.decode(ids)


def test_stream_decodes_a_small_window(tok, monkeypatch):
    # O(1) per token: no decode call may cover the whole history.
    ids = tok.encode(EMOJI_TEXT * 20)
    assert len(ids) > 300
    sizes: list[int] = []
    decode = tok.decode

    def spy(batch, skip_special_tokens=False):
        sizes.append(len(batch))
        return decode(batch, skip_special_tokens)

    monkeypatch.setattr(tok, "decode", spy)
    text = "".join(stream_all(tok, ids))
    monkeypatch.undo()
    assert text == tok.decode(ids, skip_special_tokens=True)
    assert max(sizes) <= 8
