"""A Qwen2 GGUF's tokenizer (`tokenizer.ggml.pre` = "qwen2") against the HF `tokenizers` library
running Qwen2's tokenizer, built on the same vocabulary and merges.

No downloads: a small byte-level BPE is trained here with `tokenizers` on the text below, then
written (with Qwen2's special tokens as CONTROL tokens, and the vocabulary padded with UNUSED
[PADn] tokens) to a GGUF as llama.cpp's converter writes Qwen2's. The references: a tokenizer
built as Qwen2's tokenizer.json is (NFC, Split with Qwen2's regex, ByteLevel without regex, a BPE
that applies its merges to every word), and transformers' own Qwen2Tokenizer on the same
vocabulary and merges. All three must give identical ids.
"""

from __future__ import annotations

import unicodedata
from pathlib import Path

import pytest
from tokenizers import AddedToken, decoders, models, normalizers
from tokenizers import Tokenizer as BackendTokenizer

from agent.tokenizer import Tokenizer, _bytes_to_unicode, read_tokenizer_metadata
from tests.agent.gguf_writing import byte_level_split, train_bpe, write_tokenizer_gguf
from tests.agent.test_gguf_llama3_tokenizer import CORPUS
from tests.agent.test_gguf_llama3_tokenizer import TEXTS as LLAMA3_TEXTS

gguf = pytest.importorskip("gguf")

# The split regex of Qwen2's tokenizer.json, written out here independently of agent/:
# Llama 3's, but every digit on its own.
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
PADDING = ["[PAD0]", "[PAD1]", "[PAD2]"]  # the converter pads the token list to the embedding's rows
# A whole word the merges cannot build: Qwen2's BPE (unlike Llama 3's) never yields it from text.
WHOLE_WORD = "Ġpipeshift"
QWEN2_CORPUS = CORPUS + [
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n你好，世界！123<|im_end|>\n",
] * 10
TEXTS = [
    *(t.replace("<|begin_of_text|>", "<|im_start|>").replace("<|eot_id|>", "<|im_end|>")
      .replace("<|end_of_text|>", "<|endoftext|>").replace("<|start_header_id|>", "<|im_start|>")
      .replace("<|end_header_id|>", "\n").replace("<|eom_id|>", "<|im_end|>") for t in LLAMA3_TEXTS),
    "digits 0 12 345 6789 and 2024年11月26日",
    "Cafe\u0301 nai\u0308ve",  # decomposed: NFC composes them before the split
    "ＡＢＣ１２３ full-width",  # NFC leaves compatibility characters alone (NFKC would not)
    "<|im_start|>user\n你好，世界！<|im_end|>\n<|im_start|>assistant\n",
    "x<|endoftext|>y",
]


@pytest.fixture(scope="module")
def trained() -> tuple[list[str], list[str]]:
    """(tokens in id order, merges "a b") of a small BPE trained on QWEN2_CORPUS, then WHOLE_WORD,
    Qwen2's special tokens and the padding appended, as a Qwen2 GGUF's vocabulary ends."""
    tokens, merges = train_bpe(QWEN2_CORPUS, QWEN2_PATTERN, vocab_size=800, nfc=True)
    assert WHOLE_WORD not in tokens
    return [*tokens, WHOLE_WORD, *SPECIALS, *PADDING], merges


def add_qwen2_tokenizer(writer, tokens: list[str], merges: list[str], template: str | None = None) -> None:
    """The tokenizer keys llama.cpp's converter writes for a Qwen2 Instruct model."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types([
        gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.UNUSED if t in PADDING
        else gguf.TokenType.NORMAL for t in tokens
    ])
    writer.add_token_merges(merges)
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_pad_token_id(tokens.index("<|endoftext|>"))
    writer.add_bos_token_id(tokens.index("<|endoftext|>"))
    writer.add_add_bos_token(False)
    if template is not None:
        writer.add_chat_template(template)


def write_gguf(path: Path, tokens: list[str], merges: list[str]) -> str:
    """The tokenizer keys of a Qwen2 model on a one-tensor qwen2 GGUF."""
    return write_tokenizer_gguf(path, "qwen2", len(tokens), lambda writer: add_qwen2_tokenizer(writer, tokens, merges))


@pytest.fixture(scope="module")
def ours(tmp_path_factory, trained) -> Tokenizer:
    return Tokenizer.from_gguf(write_gguf(tmp_path_factory.mktemp("qwen2-tok") / "tok.gguf", *trained))


@pytest.fixture(scope="module")
def reference(trained) -> BackendTokenizer:
    """Built as Qwen2's tokenizer.json is."""
    tokens, merges = trained
    tok = BackendTokenizer(models.BPE(
        vocab={t: i for i, t in enumerate(tokens)}, merges=[tuple(m.split(" ", 1)) for m in merges],
        fuse_unk=False, byte_fallback=False,
    ))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = byte_level_split(QWEN2_PATTERN)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    return tok


@pytest.fixture(scope="module")
def transformers_tokenizer(trained):
    """transformers' Qwen2Tokenizer on the same vocabulary and merges."""
    transformers = pytest.importorskip("transformers")
    tokens, merges = trained
    tok = transformers.Qwen2Tokenizer(
        vocab={t: i for i, t in enumerate(tokens)}, merges=[tuple(m.split(" ", 1)) for m in merges]
    )
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS[1:]], special_tokens=True)
    return tok


@pytest.mark.parametrize("text", TEXTS)
def test_ids_match_qwen2s_tokenizer(ours, reference, text):
    # Qwen2's tokenizer adds no BOS, and neither does the file (add_bos_token false)
    assert ours.encode(text) == reference.encode(text).ids
    assert ours.encode(text, add_special_tokens=False) == reference.encode(text, add_special_tokens=False).ids


@pytest.mark.parametrize("text", TEXTS)
def test_ids_match_transformers_qwen2_tokenizer(ours, transformers_tokenizer, text):
    assert ours.encode(text) == transformers_tokenizer.encode(text)


@pytest.mark.parametrize("text", TEXTS)
def test_decode_matches_and_round_trips(ours, reference, text):
    ids = reference.encode(text).ids
    for skip in (False, True):
        assert ours.decode(ids, skip_special_tokens=skip) == reference.decode(ids, skip_special_tokens=skip)
    assert ours.decode(ours.encode(text, add_special_tokens=False)) == unicodedata.normalize("NFC", text)


@pytest.mark.parametrize("text", [t for t in TEXTS if "<|" not in t])
def test_split_is_the_regex_module_split(ours, text):
    """The split against Python's `regex` module, independent of the Oniguruma regex `tokenizers` runs."""
    regex = pytest.importorskip("regex")
    spelling = _bytes_to_unicode()
    normalized = unicodedata.normalize("NFC", text)
    expected = ["".join(spelling[b] for b in piece.encode()) for piece in regex.findall(QWEN2_PATTERN, normalized)]
    assert [piece for piece, _ in ours.backend.pre_tokenizer.pre_tokenize_str(normalized)] == expected


def test_numbers_split_into_single_digits(ours):
    pieces = [p for p, _ in ours.backend.pre_tokenizer.pre_tokenize_str("x 12345 it's")]
    assert pieces == ["x", "Ġ", "1", "2", "3", "4", "5", "Ġit", "'s"]


def test_text_is_normalized_to_nfc(ours):
    assert ours.encode("e\u0301") == ours.encode("\u00e9")


def test_the_merges_apply_to_vocabulary_words(ours, reference, trained):
    """Unlike Llama 3's BPE, Qwen2's builds a word from the merges even when it is in the vocabulary."""
    ids = ours.encode(" pipeshift", add_special_tokens=False)
    assert trained[0].index(WHOLE_WORD) not in ids and len(ids) > 1
    assert ids == reference.encode(" pipeshift").ids


def test_special_tokens_and_stops(ours, trained):
    tokens = trained[0]
    im_start, im_end, endoftext = (tokens.index(t) for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"))
    assert not ours.add_bos_token and ours.eos_token_id == im_end
    # llama.cpp ends a Qwen2 generation at <|im_end|> and <|endoftext|> alike
    assert ours.stop_token_ids == {im_end, endoftext}
    ids = ours.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == im_start and ids[-1] == im_end
    assert ours.decode(ids, skip_special_tokens=True) == "user\nhi"
    # the padding tokens are never special, and decoding them yields their text
    assert ours.decode([tokens.index("[PAD0]")]) == "[PAD0]"


def test_digit_split_does_not_apply(tmp_path, trained):
    with pytest.raises(ValueError, match="digit_split applies to GPT-2-style pre-tokenizers, not 'qwen2'"):
        Tokenizer.from_gguf(write_gguf(tmp_path / "c.gguf", *trained), digit_split=True)


def test_other_pre_tokenizers_are_refused_by_name(tmp_path, trained):
    path = write_gguf(tmp_path / "d.gguf", *trained)
    meta = {**read_tokenizer_metadata(path), "tokenizer.ggml.pre": "deepseek-llm"}
    with pytest.raises(ValueError, match="unsupported GGUF pre-tokenizer 'deepseek-llm'") as refusal:
        Tokenizer.from_metadata(meta)
    assert "'qwen2'" in str(refusal.value) and "'llama-bpe'" in str(refusal.value)


def test_a_qwen2_gguf_is_served_as_transformers_computes_it(tmp_path, trained, reference):
    """Both halves at once, as a Qwen2 GGUF holds them: the qwen2 tokenizer and the model. The
    prompt's ids are Qwen2's tokenizer's, and our 2-stage logits are transformers'."""
    import torch

    from agent.loaders import resolve_model
    from tests.agent.gguf_writing import write_qwen2_gguf
    from tests.agent.stage_runner import InProcessPipeline
    from tests.agent.test_gguf_qwen2 import qwen2_model

    tokens, merges = trained
    hf_model = qwen2_model(tied=True, vocab_size=len(tokens))
    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    path = write_qwen2_gguf(
        tmp_path / "qwen2.gguf", hf_model,
        add_metadata=lambda writer: add_qwen2_tokenizer(writer, tokens, merges, template),
    )
    source = resolve_model(path)
    assert source.arch.vocab_size == len(tokens) and source.arch.tie_embeddings
    tokenizer = Tokenizer.from_gguf(source.path)
    ids = tokenizer.encode_chat([{"role": "user", "content": "It's 2024: count 12345 apples, naïvely.\n\n  Done"}])
    prompt = "<|im_start|>user\nIt's 2024: count 12345 apples, naïvely.\n\n  Done<|im_end|>\n<|im_start|>assistant\n"
    assert ids == reference.encode(prompt).ids
    with torch.no_grad():
        expected = hf_model(torch.tensor([ids])).logits[0]
    pipe = InProcessPipeline(source, [(0, 1), (1, 3)], block_size=4)
    logits = pipe.step(["r"], [0], [len(ids)], torch.tensor(ids), all_rows=True)
    assert (logits - expected).abs().max().item() <= 1e-4
