"""Chat templates of a model directory saved by transformers 5, read as transformers reads them.

transformers 5 writes a tokenizer's template to chat_template.jinja (named extra ones to
additional_chat_templates/) and leaves it out of tokenizer_config.json. Each directory here is
saved by the installed transformers itself (a tiny random Llama plus SmolLM2's tokenizer, as in
tests/integration/test_serve_safetensors.py), and our prompt ids are compared with
`AutoTokenizer.from_pretrained(dir).apply_chat_template`'s. A model without a template refuses
chat with a 400 `EngineError` that points to /v1/completions.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

from agent.engine_api import EngineError
from agent.loaders.gguf_file import GGUFFile
from agent.tokenizer import NoChatTemplate, Tokenizer

transformers = pytest.importorskip("transformers")

CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3 + 3? 🙂"},
    ],
]
TOOL_TEMPLATE = "{{ 'tools: ' + messages[0]['content'] }}"


@pytest.fixture(scope="module")
def smollm2_template(gguf_path: Path) -> str:
    return GGUFFile(gguf_path).metadata["tokenizer.chat_template"]


def save_model_dir(
    directory: Path, gguf_path: Path, template: str | dict[str, str] | None, **save_kwargs: Any
) -> Path:
    """Returns `directory`, holding a tiny random Llama and SmolLM2's tokenizer with `template`,
    both written by transformers' own `save_pretrained`."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        num_hidden_layers=1,
        hidden_size=16,
        intermediate_size=32,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=49152,  # SmolLM2's tokenizer
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(directory, safe_serialization=True)
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_gguf(gguf_path).backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        chat_template=template,
    ).save_pretrained(str(directory), **save_kwargs)
    return directory


def tokenizer_config(directory: Path) -> dict[str, Any]:
    return json.loads((directory / "tokenizer_config.json").read_text())


def transformers_ids(directory: Path, messages: list[dict[str, str]]) -> list[int]:
    """Returns transformers' prompt ids for `messages` as a plain list (transformers 5 answers
    a BatchEncoding where 4.x answered a list)."""
    out = transformers.AutoTokenizer.from_pretrained(str(directory)).apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True
    )
    ids = out["input_ids"] if isinstance(out, Mapping) else out
    return [int(i) for i in ids]


def test_a_directory_saved_by_transformers_5_chats_as_transformers_does(
    tmp_path: Path, gguf_path: Path, smollm2_template: str
) -> None:
    directory = save_model_dir(tmp_path, gguf_path, smollm2_template)
    # The layout in question, so that this cannot pass on a template kept in the config.
    assert (directory / "chat_template.jinja").is_file()
    assert (directory / "model.safetensors").is_file()
    assert "chat_template" not in tokenizer_config(directory)
    ours = Tokenizer.from_hf_dir(directory)
    assert ours.chat_template == smollm2_template
    for messages in CONVERSATIONS:
        assert ours.encode_chat(messages) == transformers_ids(directory, messages)


def test_named_templates_use_the_default_from_chat_template_jinja(
    tmp_path: Path, gguf_path: Path, smollm2_template: str
) -> None:
    templates = {"default": smollm2_template, "tool_use": TOOL_TEMPLATE}
    directory = save_model_dir(tmp_path, gguf_path, templates)
    assert (directory / "additional_chat_templates" / "tool_use.jinja").is_file()
    assert "chat_template" not in tokenizer_config(directory)
    ours = Tokenizer.from_hf_dir(directory)
    assert ours.chat_template == smollm2_template
    messages = CONVERSATIONS[1]
    assert ours.encode_chat(messages) == transformers_ids(directory, messages)


def test_template_files_win_over_a_template_in_the_config(
    tmp_path: Path, gguf_path: Path, smollm2_template: str
) -> None:
    directory = save_model_dir(tmp_path, gguf_path, smollm2_template)
    config = tokenizer_config(directory)
    config["chat_template"] = "{{ 'stale' }}"  # e.g. left by an older save into the same dir
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    assert transformers.AutoTokenizer.from_pretrained(str(directory)).chat_template == (
        smollm2_template
    )
    assert Tokenizer.from_hf_dir(directory).chat_template == smollm2_template
    messages = CONVERSATIONS[1]
    assert Tokenizer.from_hf_dir(directory).encode_chat(messages) == transformers_ids(
        directory, messages
    )


def test_named_template_files_without_a_default_leave_none(
    tmp_path: Path, gguf_path: Path, smollm2_template: str
) -> None:
    # The files replace the config's template in transformers even with no default among them;
    # transformers then refuses a chat without a template name, and we have no template.
    directory = save_model_dir(tmp_path, gguf_path, {"tool_use": TOOL_TEMPLATE})
    assert not (directory / "chat_template.jinja").exists()
    config = tokenizer_config(directory)
    config["chat_template"] = smollm2_template
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="no default"):
        transformers_ids(directory, CONVERSATIONS[0])
    ours = Tokenizer.from_hf_dir(directory)
    assert ours.chat_template is None
    with pytest.raises(NoChatTemplate):
        ours.encode_chat(CONVERSATIONS[0])


def test_a_template_kept_in_the_config_still_works(
    tmp_path: Path, gguf_path: Path, smollm2_template: str
) -> None:
    # The transformers 4 layout (no .jinja file): unchanged behaviour, guarded here.
    directory = save_model_dir(tmp_path, gguf_path, smollm2_template, save_jinja_files=False)
    assert not (directory / "chat_template.jinja").exists()
    assert tokenizer_config(directory)["chat_template"] == smollm2_template
    messages = CONVERSATIONS[1]
    assert Tokenizer.from_hf_dir(directory).encode_chat(messages) == transformers_ids(
        directory, messages
    )


def test_a_model_without_a_template_refuses_chat_with_a_400(
    tmp_path: Path, gguf_path: Path
) -> None:
    directory = save_model_dir(tmp_path, gguf_path, None)
    assert not (directory / "chat_template.jinja").exists()
    assert tokenizer_config(directory)["chat_template"] is None  # transformers writes a null
    ours = Tokenizer.from_hf_dir(directory)
    assert ours.chat_template is None
    with pytest.raises(EngineError) as caught:
        ours.encode_chat(CONVERSATIONS[0])
    error = caught.value
    assert isinstance(error, NoChatTemplate) and isinstance(error, ValueError)
    assert (error.status, error.param) == (400, "messages")
    assert "no chat template" in error.message and "/v1/completions" in error.message
    # A plain prompt, as the message advises, still works.
    theirs = transformers.AutoTokenizer.from_pretrained(str(directory))
    assert ours.encode("hi there") == theirs("hi there")["input_ids"]


def test_a_template_that_dates_its_prompt_gets_todays_date_as_in_transformers(
    tmp_path: Path, gguf_path: Path
) -> None:
    """Llama 3.2's template calls strftime_now when it is defined, else writes a fixed date."""
    from datetime import datetime

    dated = ("{%- if strftime_now is defined %}{%- set d = strftime_now('%d %b %Y') %}"
             "{%- else %}{%- set d = '26 Jul 2024' %}{%- endif %}"
             "Today Date: {{ d }}\n{% for m in messages %}{{ m['content'] }}{% endfor %}")
    directory = save_model_dir(tmp_path, gguf_path, dated)
    messages = CONVERSATIONS[0]
    ours = Tokenizer.from_hf_dir(directory)
    assert ours.encode_chat(messages) == transformers_ids(directory, messages)
    assert datetime.now().strftime("%d %b %Y") in ours.decode(ours.encode_chat(messages))
