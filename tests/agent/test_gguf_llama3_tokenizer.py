"""A Llama 3 GGUF's tokenizer (`tokenizer.ggml.pre` = "llama-bpe") against the HF `tokenizers`
library running the tokenizer.json Llama 3 ships, built on the same vocabulary and merges.

No downloads: a small byte-level BPE is trained here with `tokenizers` on the text below, then
written (with Llama 3's special tokens as CONTROL tokens) to a GGUF as llama.cpp's converter
writes Llama 3's, and to a tokenizer.json shaped like Meta's (Split regex + ByteLevel without
regex, BPE ignoring merges, BOS added by its post-processor). Both must give identical ids.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer as BackendTokenizer

from agent.tokenizer import Tokenizer, _bytes_to_unicode
from tests.agent.gguf_writing import train_bpe, write_tokenizer_gguf
from tests.tiny_llama import tiny_llama_config

gguf = pytest.importorskip("gguf")

# The split regex of Llama 3's tokenizer.json, written out here independently of agent/.
META_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIALS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
    "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>",
]
# A whole word the merges cannot build: only a BPE that ignores merges for vocabulary words
# (Llama 3's, and llama.cpp's for llama-bpe) encodes " pipeshift" as this one token.
WHOLE_WORD = "Ġpipeshift"
CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's 2024, and we'll see what they've done.",
    "I'm sure you'd say they're right; I'll check what's there. DON'T SHOUT, it'S fine.",
    "Numbers: 1, 12, 123, 1234, 12345, 123456, 3.14159, 2026-11-26, 0x1F, 1e-5, 99 bottles.",
    "def main(argv):\n    for i in range(10):\n        print(f\"{i:>4}\")  # comment\n    return 0\n",
    "Café naïve résumé Ångström über straße. 日本語のテキスト 中文 한국어 Привет мир!",
    "Emoji 🙂 and family 👨‍👩‍👧 and flags 🇫🇷 — dashes – and “quotes” ‘here’…",
    "\n\nTabs\tand\t\tspaces    between   words\r\nWindows lines\r\n\r\nend.  \n",
    "Hello world! hello World? HELLO... (parentheses) [brackets] {braces} <angle> $100 50% #tag @user",
] * 20
TEXTS = [
    "",
    "7", "42", "123", "2024", "98765", "1234567", "x 12345 y", "a1b22c333d4444e55555",
    "3.14159", "2026-11-26", "pi is 3.14159, not 22/7", "$1,234,567.89",
    "it's we'll they've I'm you'd she'S WE'LL THEY'RE don't", "'s 'll 're",
    "Café naïve résumé Ångström", "日本語のテキスト 中文 한국어", "Привет, мир!",
    "I feel 🙂 today 👨‍👩‍👧!", "🇫🇷🇩🇪",
    "a   b\t\tc\n\n\nd", "   leading spaces", "trailing spaces   ", " ", "  ", "\n", "\n\n\n",
    "x\r\ny\r\n\r\nz", "line one\n  indented\n\tx", "  \n  \n ", "end.\n\n\n  ",
    "def f(x):\n    return x ** 2  # square\n",
    " pipeshift serves pipeshift", "Hello World HELLO wOrLd",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi 123<|eot_id|>",
    "text<|end_of_text|>more<|eom_id|>\n",
]


@pytest.fixture(scope="module")
def trained() -> tuple[list[str], list[str]]:
    """(tokens in id order, merges "a b") of a small BPE trained on CORPUS, then WHOLE_WORD and
    Llama 3's special tokens appended, as a Llama 3 vocabulary ends with its specials."""
    tokens, merges = train_bpe(CORPUS, META_PATTERN, vocab_size=700)
    assert WHOLE_WORD not in tokens
    return [*tokens, WHOLE_WORD, *SPECIALS], merges


def write_gguf(path: Path, tokens: list[str], merges: list[str], add_bos: bool | None = None) -> str:
    """The tokenizer keys of a Llama 3 model on a one-tensor llama GGUF."""
    return write_tokenizer_gguf(path, "llama", len(tokens),
                                lambda writer: add_llama3_tokenizer(writer, tokens, merges, add_bos))


def add_llama3_tokenizer(writer, tokens: list[str], merges: list[str], add_bos: bool | None = None) -> None:
    """The tokenizer keys llama.cpp's converter writes for a Llama 3 model (no add_bos_token key,
    no EOT id: llama.cpp supplies both for llama-bpe)."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("llama-bpe")
    writer.add_token_list(tokens)
    writer.add_token_types(
        [gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.NORMAL for t in tokens]
    )
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokens.index("<|begin_of_text|>"))
    writer.add_eos_token_id(tokens.index("<|end_of_text|>"))
    if add_bos is not None:
        writer.add_add_bos_token(add_bos)


def meta_tokenizer_json(tokens: list[str], merges: list[str]) -> str:
    """A tokenizer.json shaped like the one Llama 3 ships."""
    bos = tokens.index("<|begin_of_text|>")
    return json.dumps({
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": tokens.index(t), "content": t, "single_word": False, "lstrip": False,
             "rstrip": False, "normalized": False, "special": True}
            for t in SPECIALS
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": META_PATTERN}, "behavior": "Isolated",
             "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
             "use_regex": False},
        ]},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}},
                     {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 1}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<|begin_of_text|>": {
                "id": "<|begin_of_text|>", "ids": [bos], "tokens": ["<|begin_of_text|>"]}},
        },
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
            "ignore_merges": True, "vocab": {t: i for i, t in enumerate(tokens)}, "merges": merges,
        },
    })


@pytest.fixture(scope="module")
def ours(tmp_path_factory, trained) -> Tokenizer:
    path = tmp_path_factory.mktemp("llama3-tok") / "tok.gguf"
    return Tokenizer.from_gguf(write_gguf(path, *trained))


@pytest.fixture(scope="module")
def reference(trained) -> BackendTokenizer:
    return BackendTokenizer.from_str(meta_tokenizer_json(*trained))


@pytest.mark.parametrize("text", TEXTS)
def test_ids_match_llama3_tokenizer_json(ours, reference, text):
    assert ours.encode(text) == reference.encode(text).ids
    assert ours.encode(text, add_special_tokens=False) == reference.encode(
        text, add_special_tokens=False).ids


@pytest.mark.parametrize("text", TEXTS)
def test_decode_matches_and_round_trips(ours, reference, text):
    ids = reference.encode(text).ids
    for skip in (False, True):
        assert ours.decode(ids, skip_special_tokens=skip) == reference.decode(
            ids, skip_special_tokens=skip)
    assert ours.decode(ours.encode(text, add_special_tokens=False)) == text


@pytest.mark.parametrize("text", [t for t in TEXTS if "<|" not in t])
def test_split_is_the_regex_module_split(ours, text):
    """The split against Python's `regex` module (the engine of Meta's tiktoken-based Llama 3
    tokenizer), independent of the Oniguruma regex `tokenizers` runs."""
    regex = pytest.importorskip("regex")
    spelling = _bytes_to_unicode()
    expected = ["".join(spelling[b] for b in piece.encode()) for piece in regex.findall(META_PATTERN, text)]
    assert [piece for piece, _ in ours.backend.pre_tokenizer.pre_tokenize_str(text)] == expected


def test_numbers_split_in_runs_of_three_digits(ours):
    pieces = [p for p, _ in ours.backend.pre_tokenizer.pre_tokenize_str("x 12345 1234567")]
    assert pieces == ["x", "Ġ", "123", "45", "Ġ", "123", "456", "7"]


def test_a_vocabulary_word_is_one_token_though_no_merges_build_it(ours, trained):
    tokens = trained[0]
    assert ours.encode(" pipeshift", add_special_tokens=False) == [tokens.index(WHOLE_WORD)]


def test_special_tokens_follow_the_token_types(ours, trained):
    tokens = trained[0]
    bos, eot = tokens.index("<|begin_of_text|>"), tokens.index("<|eot_id|>")
    assert ours.bos_token_id == bos and ours.eos_token_id == tokens.index("<|end_of_text|>")
    ids = ours.encode("<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>")
    assert ids[0] == bos and ids[1] == tokens.index("<|start_header_id|>") and ids[-1] == eot
    assert ours.decode(ids, skip_special_tokens=True) == "user\n\nhi"
    # a control token is matched whole, never merged from its pieces
    assert ours.encode("a<|eot_id|>b", add_special_tokens=False) == [
        tokens.index("a"), eot, tokens.index("b")]


def test_bos_is_added_unless_the_file_says_not(tmp_path, trained):
    assert Tokenizer.from_gguf(write_gguf(tmp_path / "a.gguf", *trained)).add_bos_token
    off = Tokenizer.from_gguf(write_gguf(tmp_path / "b.gguf", *trained, add_bos=False))
    assert not off.add_bos_token and off.encode("hi")[0] != trained[0].index("<|begin_of_text|>")


def test_generation_stops_at_llama3_end_tokens(ours, trained):
    tokens = trained[0]
    assert ours.stop_token_ids == {tokens.index(t) for t in ("<|end_of_text|>", "<|eot_id|>", "<|eom_id|>")}


def test_digit_split_does_not_apply(tmp_path, trained):
    with pytest.raises(ValueError, match="digit_split applies to GPT-2-style"):
        Tokenizer.from_gguf(write_gguf(tmp_path / "c.gguf", *trained), digit_split=True)


def test_a_llama31_shaped_gguf_is_served_as_transformers_computes_it(tmp_path, trained, reference):
    """Both halves at once, as a Llama 3.1 GGUF holds them: llama-bpe tokenizer and RoPE factors.
    The prompt's ids are the tokenizer.json's, and our 2-stage logits are transformers'."""
    import torch

    from agent.loaders import resolve_model
    from tests.agent.gguf_writing import write_llama_gguf
    from tests.agent.stage_runner import InProcessPipeline
    from tests.agent.test_gguf_llama3_rope import LLAMA3_SCALING, llama3_factors

    transformers = pytest.importorskip("transformers")
    tokens, merges = trained
    torch.manual_seed(0)
    config = tiny_llama_config(
        vocab_size=len(tokens), max_position_embeddings=128, tie_word_embeddings=True,
        rope_scaling=LLAMA3_SCALING,
    )
    hf_model = transformers.LlamaForCausalLM(config).float().eval()
    path = write_llama_gguf(
        tmp_path / "llama31.gguf", hf_model, rope_freqs=llama3_factors(config),
        add_metadata=lambda writer: add_llama3_tokenizer(writer, tokens, merges),
    )
    source = resolve_model(path)
    prompt = "It's 2024: we'll count 12345 apples, naïvely.\n\n  Done<|eot_id|>"
    ids = Tokenizer.from_gguf(source.path).encode(prompt)
    assert ids == reference.encode(prompt).ids
    with torch.no_grad():
        expected = hf_model(torch.tensor([ids])).logits[0]
    pipe = InProcessPipeline(source, [(0, 1), (1, 2)], block_size=4)
    ours = pipe.step(["r"], [0], [len(ids)], torch.tensor(ids), all_rows=True)
    assert (ours - expected).abs().max().item() <= 1e-4
