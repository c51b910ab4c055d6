"""The tokenizer of a GGUF model, built from the file's metadata, and a streaming detokenizer.

A GGUF carries no `tokenizer.json`: it stores the vocabulary, merges, token types, special ids
and chat template under llama.cpp's `tokenizer.*` keys. We rebuild a `tokenizers` BPE from them
the way transformers does for the same file (`AutoTokenizer(gguf_file=...)`), except for the
digit split noted at `_DIGIT_SPLIT_BY_PRE`, where we follow the model's own tokenizer; a Llama 3
or Qwen2 file (`_SPLIT_BY_PRE`) gets the pre-tokenizer and BPE of its model's own tokenizer.json:

    tok = Tokenizer.from_gguf(path)
    ids = tok.encode_chat([{"role": "user", "content": "hi"}])
    stream = tok.detokenize_stream()
    text = "".join(stream.push(i) for i in generated) + stream.flush()
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as BackendTokenizer

from agent.engine_api import EngineError

# llama.cpp token types (gguf.TokenType): 3 is CONTROL (special tokens like <|im_end|>),
# 4 is USER_DEFINED (added tokens that are matched whole but are not special).
_CONTROL, _USER_DEFINED = 3, 4

# `tokenizer.ggml.pre` -> whether digits are isolated before GPT-2's byte-level split. Values
# in neither this table nor _SPLIT_BY_PRE (deepseek, ...) need their own regex, which we have
# not built: refuse them rather than tokenize subtly wrong.
# "smollm" isolates digits: SmolLM2's own tokenizer.json is Digits(individual) + ByteLevel, and
# llama.cpp splits "\p{N}" first for it. transformers (5.24) has no entry for "smollm" and uses
# plain ByteLevel; ids then differ only where whitespace precedes a digit ("a  1": ours a|ĠĠ|1,
# transformers a|Ġ|Ġ|1), as no vocabulary token joins a digit to anything. We follow the model.
_DIGIT_SPLIT_BY_PRE = {"smollm": True, "gpt2": False, "default": False, None: False}

@dataclass(frozen=True)
class _SplitPreTokenizer:
    """A `tokenizer.ggml.pre` whose text is split by a regex ahead of a byte-level map without
    GPT-2's regex, as its model's own tokenizer.json does, and what else that tokenizer does."""

    pattern: str
    ignore_merges: bool  # a word that is a vocabulary token is that token (Llama 3's BPE)
    nfc: bool  # the text is normalized to NFC first
    add_bos: bool  # when the file does not say (llama.cpp's default for it)
    end_of_generation: tuple[str, ...]  # tokens that end a generation, found by their text


# Llama 3's split is the regex of its tokenizer.json (tiktoken's cl100k-style pattern:
# contractions, letters with one leading non-letter, numbers in runs of at most three digits,
# punctuation, newlines, spaces). Its BPE ignores merges, and llama.cpp adds BOS unless the file
# says not to and finds its end tokens by their text (the converter writes no EOT/EOM id).
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3 = _SplitPreTokenizer(LLAMA3_SPLIT_PATTERN, ignore_merges=True, nfc=False, add_bos=True,
                             end_of_generation=("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"))
# Qwen2's (Qwen2, Qwen2.5) is Llama 3's regex with each digit on its own ("\p{N}"); its BPE
# applies the merges to every word, and its tokenizer.json normalizes text to NFC first
# (transformers' Qwen2Tokenizer and its GGUF loader do; llama.cpp does not, so the two differ
# only on text that is not already NFC, such as a decomposed "é": we follow the model's own).
# An Instruct file's EOS is <|im_end|>, a base one's <|endoftext|>; llama.cpp stops at both.
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = _SplitPreTokenizer(QWEN2_SPLIT_PATTERN, ignore_merges=False, nfc=True, add_bos=False,
                            end_of_generation=("<|im_end|>", "<|endoftext|>"))
# `tokenizer.ggml.pre` -> its split. llama.cpp's converter names Llama 3's "llama-bpe" ("llama3"
# and "llama-v3" in older files; llama.cpp treats the three alike).
_SPLIT_BY_PRE = {"llama-bpe": _LLAMA3, "llama3": _LLAMA3, "llama-v3": _LLAMA3, "qwen2": _QWEN2}


@cache
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to the printable character byte-level vocabularies spell it with."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shifted)
            shifted += 1
    return mapping


# Where transformers 5 saves chat templates beside tokenizer_config.json (transformers.utils.hub).
CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_DIR = "additional_chat_templates"


def _hf_chat_template(directory: Path, config: dict[str, Any]) -> str | None:
    """Returns the chat template a chat without tools uses, found as transformers 5.x finds it
    (None: the model has none).

    transformers 5 saves a single template to chat_template.jinja, named ones to
    additional_chat_templates/NAME.jinja (the default still to chat_template.jinja), and leaves
    the `chat_template` key out of tokenizer_config.json. Its loader
    (`PreTrainedTokenizerBase._from_pretrained`, 5.24) reads chat_template.jinja as "default",
    then each additional_chat_templates/*.jinja under its name (a default.jinja there overwrites
    it), and if it read any file these replace the config's `chat_template` outright, even when
    the config has one too; `get_chat_template` then takes "default", and without one refuses.
    We follow that rule. Only with no such files does the config's key count: a string, or
    (older transformers) a list of {"name", "template"} of which we take "default".
    """
    files: dict[str, str] = {}
    default_file = directory / CHAT_TEMPLATE_FILE
    if default_file.is_file():
        files["default"] = default_file.read_text(encoding="utf-8")
    named_dir = directory / CHAT_TEMPLATE_DIR
    if named_dir.is_dir():
        for path in sorted(named_dir.glob("*.jinja")):
            files[path.name.removesuffix(".jinja")] = path.read_text(encoding="utf-8")
    if files:
        return files.get("default")
    template = config.get("chat_template")
    if isinstance(template, list):
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template if isinstance(template, str) else None


def _generation_config_eos(directory: Path) -> tuple[int, ...]:
    """The `eos_token_id` of a HF directory's generation_config.json (an id or a list of them),
    where transformers' `generate` and vLLM read the ids that end a generation."""
    path = directory / "generation_config.json"
    if not path.is_file():
        return ()
    try:
        value = json.loads(path.read_text()).get("eos_token_id")
    except (ValueError, AttributeError):
        return ()
    values = value if isinstance(value, list) else [value]
    return tuple(v for v in values if isinstance(v, int) and not isinstance(v, bool))


def read_tokenizer_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The `tokenizer.*` keys of a GGUF file, as plain Python values."""
    # The project's own header parser: `gguf.GGUFReader` takes ~3 s on this vocabulary, it ~0.15 s.
    from agent.loaders.gguf_file import GGUFFile

    meta = GGUFFile(path).metadata
    return {key: value for key, value in meta.items() if key.startswith("tokenizer.")}


@dataclass(frozen=True)
class SpecialIds:
    """The special token ids the GGUF names (None where it names none)."""

    bos: int | None
    eos: int | None
    pad: int | None
    unk: int | None


class Tokenizer:
    """A byte-level BPE tokenizer plus the model's chat template."""

    def __init__(
        self,
        backend: BackendTokenizer,
        special: SpecialIds,
        *,
        add_bos_token: bool = False,
        add_eos_token: bool = False,
        chat_template: str | None = None,
        backend_adds_special: bool = False,
        stop_token_ids: tuple[int, ...] = (),
    ) -> None:
        self.backend = backend
        self.special = special
        # Every id that ends a generation: the EOS and the model's other end-of-generation ids
        # (a HF directory's generation_config.json; a GGUF's EOT/EOM), as transformers and
        # llama.cpp stop at each of them.
        self.stop_token_ids = frozenset(
            i for i in (special.eos, *stop_token_ids) if i is not None
        )
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        # A tokenizer.json carries its own post-processor (e.g. Llama 3's BOS template).
        self.backend_adds_special = backend_adds_special
        self.chat_template = chat_template
        self._template = _compile_template(chat_template) if chat_template else None

    @classmethod
    def from_gguf(
        cls, path: str | os.PathLike[str], *, digit_split: bool | None = None
    ) -> Tokenizer:
        """`digit_split=None` follows the file's `tokenizer.ggml.pre`; False reproduces
        transformers' GGUF loader exactly (see `_DIGIT_SPLIT_BY_PRE`)."""
        return cls.from_metadata(read_tokenizer_metadata(path), digit_split=digit_split)

    @classmethod
    def from_hf_dir(cls, directory: str | os.PathLike[str]) -> Tokenizer:
        """Returns the tokenizer of a Hugging Face model directory: `tokenizer.json`, special
        tokens from `tokenizer_config.json`, and the chat template (see `_hf_chat_template`)."""
        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.exists():
            raise FileNotFoundError(
                f"{directory} has no tokenizer.json: save the model's tokenizer next to its weights"
            )
        backend = BackendTokenizer.from_file(str(path))
        config_path = directory / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.exists() else {}

        def token_id(key: str) -> int | None:
            value = config.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            return backend.token_to_id(value) if isinstance(value, str) else None

        generation_eos = _generation_config_eos(directory)
        eos = token_id("eos_token")
        special = SpecialIds(
            bos=token_id("bos_token"),
            eos=eos if eos is not None else next(iter(generation_eos), None),
            pad=token_id("pad_token"),
            unk=token_id("unk_token"),
        )
        template = _hf_chat_template(directory, config)
        return cls(backend, special, chat_template=template, backend_adds_special=True,
                   stop_token_ids=generation_eos)

    @classmethod
    def from_metadata(cls, meta: dict[str, Any], *, digit_split: bool | None = None) -> Tokenizer:
        model = meta.get("tokenizer.ggml.model")
        if model != "gpt2":
            raise ValueError(
                f"only byte-level BPE ('gpt2') GGUF tokenizers are supported, got {model!r}"
            )
        tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
        types: list[int] = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
        alphabet = set(_bytes_to_unicode().values())
        spelling = _bytes_to_unicode()
        # A few converters store some tokens as raw text; the BPE model needs every token spelled
        # in the byte alphabet, as the merges are. (transformers respells the same way.)
        vocab = {
            tok if set(tok) <= alphabet else "".join(spelling[b] for b in tok.encode()): i
            for i, tok in enumerate(tokens)
        }
        merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
        pre = meta.get("tokenizer.ggml.pre")
        regex = _SPLIT_BY_PRE.get(pre)
        if regex is None and digit_split is None and pre not in _DIGIT_SPLIT_BY_PRE:
            supported = sorted([*(p for p in _DIGIT_SPLIT_BY_PRE if p), *_SPLIT_BY_PRE])
            raise ValueError(
                f"unsupported GGUF pre-tokenizer {pre!r} (tokenizer.ggml.pre): pipeshift "
                f"tokenizes {', '.join(map(repr, supported))}"
            )
        if regex is not None and digit_split is not None:
            raise ValueError(f"digit_split applies to GPT-2-style pre-tokenizers, not {pre!r}")
        backend = BackendTokenizer(models.BPE(
            vocab=vocab, merges=merges, fuse_unk=False, ignore_merges=regex is not None and regex.ignore_merges
        ))
        if regex is not None and regex.nfc:
            backend.normalizer = normalizers.NFC()
        add_prefix_space = bool(meta.get("tokenizer.ggml.add_space_prefix", False))
        if regex is not None:
            split = [
                pre_tokenizers.Split(Regex(regex.pattern), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=False),
            ]
        else:
            split = [pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)]
            if digit_split is None:
                digit_split = _DIGIT_SPLIT_BY_PRE[pre]
            if digit_split:
                split.insert(0, pre_tokenizers.Digits(individual_digits=True))
        backend.pre_tokenizer = pre_tokenizers.Sequence(split)
        backend.decoder = decoders.ByteLevel()

        # Control tokens become special tokens so "<|im_start|>" in text maps to its id and
        # decode(skip_special_tokens=True) drops it. A control token spelled outside the byte
        # alphabet is a converter mislabel (transformers skips those too).
        backend.add_special_tokens(
            [
                AddedToken(tok, special=True, normalized=False)
                for tok, kind in zip(tokens, types, strict=True)
                if kind == _CONTROL and set(tok) <= alphabet
            ]
        )
        backend.add_tokens(
            [
                AddedToken(tok, special=False, normalized=False)
                for tok, kind in zip(tokens, types, strict=True)
                if kind == _USER_DEFINED and tok in vocab
            ]
        )

        def token_id(key: str) -> int | None:
            value = meta.get(f"tokenizer.ggml.{key}")
            return int(value) if value is not None else None

        special = SpecialIds(
            bos=token_id("bos_token_id"),
            eos=token_id("eos_token_id"),
            pad=token_id("padding_token_id"),
            unk=token_id("unknown_token_id"),
        )
        # llama.cpp ends a generation at EOS, EOT (Llama 3's <|eot_id|>) and EOM alike.
        stops = [i for i in (token_id("eot_token_id"), token_id("eom_token_id")) if i is not None]
        stops += [vocab[t] for t in (regex.end_of_generation if regex is not None else ()) if t in vocab]
        return cls(
            backend,
            special,
            add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", regex is not None and regex.add_bos)),
            add_eos_token=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
            chat_template=meta.get("tokenizer.chat_template"),
            stop_token_ids=tuple(stops),
        )

    # -- ids -------------------------------------------------------------------------------

    @property
    def bos_token_id(self) -> int | None:
        return self.special.bos

    @property
    def eos_token_id(self) -> int | None:
        return self.special.eos

    @property
    def pad_token_id(self) -> int | None:
        return self.special.pad

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_text(self, token_id: int) -> str:
        """The decoded text of one token (special tokens included)."""
        return self.backend.decode([token_id], skip_special_tokens=False)

    # -- text <-> ids ----------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids for `text`; special-token strings inside it map to their ids."""
        if self.backend_adds_special:
            return self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens:
            if self.add_bos_token and self.special.bos is not None:
                ids.insert(0, self.special.bos)
            if self.add_eos_token and self.special.eos is not None:
                ids.append(self.special.eos)
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # -- chat ------------------------------------------------------------------------------

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True
    ) -> str:
        """The prompt text for `messages`, rendered as transformers renders the same template."""
        if self._template is None:
            raise NoChatTemplate()
        if not messages:
            raise ValueError("cannot apply a chat template to an empty conversation")
        # Templates may use bos_token/eos_token by name: transformers passes them the same way.
        ids = {
            "bos": self.special.bos,
            "eos": self.special.eos,
            "pad": self.special.pad,
            "unk": self.special.unk,
        }
        names = {f"{name}_token": self.token_text(i) for name, i in ids.items() if i is not None}
        return self._template.render(
            messages=messages,
            tools=None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **names,
        )

    def encode_chat(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True
    ) -> list[int]:
        """Returns the prompt ids of a chat; raises `NoChatTemplate` (a 400 `EngineError`) when
        the model has no chat template."""
        # The template writes any BOS it wants itself, so no special tokens are added (as transformers).
        return self.encode(
            self.apply_chat_template(messages, add_generation_prompt), add_special_tokens=False
        )

    def detokenize_stream(self, skip_special_tokens: bool = True) -> DetokenizeStream:
        return DetokenizeStream(self, skip_special_tokens=skip_special_tokens)


class NoChatTemplate(EngineError, ValueError):
    """The model ships no chat template, so chat messages cannot be turned into a prompt.

    An `EngineError` with status 400: the client has to change the request (send a plain prompt
    to /v1/completions, as vLLM also tells it), so any engine that lets this propagate from
    `encode_chat` gets a 400 from the gateway, never a 500. Still a ValueError, as before.
    """

    def __init__(
        self,
        message: str = (
            "this model has no chat template, so chat messages cannot be turned into a prompt: "
            "send a plain prompt to /v1/completions instead (or serve a model whose tokenizer "
            "has a chat template)"
        ),
    ) -> None:
        super().__init__(message, status=400, param="messages")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _compile_template(source: str) -> jinja2.Template:
    # Same environment transformers uses: chat templates come from model files, so untrusted.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now  # Llama 3.2's template dates its system header
    return env.from_string(source)


def _strftime_now(fmt: str) -> str:
    """Returns the local time now in `fmt`, as transformers gives chat templates."""
    return datetime.now().strftime(fmt)


class DetokenizeStream:
    """Turns generated ids, one at a time, into text deltas for streaming.

    Byte-level BPE splits a character across tokens (an emoji is often 3 tokens), so a token on its
    own may decode to U+FFFD. Like vLLM, we decode only a short window: the tokens of the last
    emitted delta (`prefix`) plus the ones not yet emitted, and emit what the window adds beyond
    the prefix once it no longer ends in U+FFFD. The window starts at a character boundary, so
    the deltas concatenate to `decode(all_ids)` (after `flush()`).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # window start: first id of the last emitted delta
        self._read = 0  # first id not yet emitted

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes ("" while a character is still partial)."""
        self.ids.append(token_id)
        prefix_text = self._tok.decode(self.ids[self._prefix : self._read], self._skip)
        text = self._tok.decode(self.ids[self._prefix :], self._skip)
        # A valid character needs at most 4 bytes, so this holds back a few tokens at most,
        # unless the model emits invalid UTF-8; flush() then releases it.
        if text.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return text[len(prefix_text) :]

    def flush(self) -> str:
        """At the end of the stream: whatever is still held back (invalid UTF-8 comes out as
        U+FFFD, as in `decode`)."""
        prefix_text = self._tok.decode(self.ids[self._prefix : self._read], self._skip)
        text = self._tok.decode(self.ids[self._prefix :], self._skip)
        # An empty window from here on: later ids must not be decoded with a partial character.
        self._prefix = self._read = len(self.ids)
        return text[len(prefix_text) :]


def load_tokenizer(model_format: str, path: str | os.PathLike[str]) -> Tokenizer:
    """Returns the tokenizer that ships with a model: GGUF metadata, or a HF directory's files."""
    return Tokenizer.from_gguf(path) if model_format == "gguf" else Tokenizer.from_hf_dir(path)
