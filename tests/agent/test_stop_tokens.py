"""The ids that end a generation: the EOS plus the model's other end-of-generation ids, as
transformers' `generate` (a HF directory's generation_config.json) and llama.cpp (a GGUF's
EOT/EOM) stop at each of them. Llama 3 Instruct's tokenizer_config.json names
<|end_of_text|> while its chat turns end with <|eot_id|>, which only generation_config.json lists."""

from __future__ import annotations

import json

import pytest

from agent.tokenizer import Tokenizer
from tests.tiny_llama import save_tokenizer

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, gguf_path):
    directory = tmp_path_factory.mktemp("tokenizer")
    save_tokenizer(directory, gguf_path, template=None)
    return directory


def set_files(directory, eos_token: str | None, generation_eos) -> None:
    path = directory / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config.pop("eos_token", None)
    if eos_token is not None:
        config["eos_token"] = eos_token
    path.write_text(json.dumps(config))
    generation = directory / "generation_config.json"
    generation.unlink(missing_ok=True)
    if generation_eos is not None:
        generation.write_text(json.dumps({"eos_token_id": generation_eos}))


def test_without_generation_config_the_eos_alone_stops(hf_dir):
    set_files(hf_dir, "<|im_end|>", None)
    tok = Tokenizer.from_hf_dir(hf_dir)
    assert tok.eos_token_id == 2 and tok.stop_token_ids == {2}


@pytest.mark.parametrize("generation_eos", [[0, 2], 2])
def test_generation_config_ids_stop_too(hf_dir, generation_eos):
    set_files(hf_dir, "<|endoftext|>", generation_eos)
    tok = Tokenizer.from_hf_dir(hf_dir)
    assert tok.eos_token_id == 0
    assert tok.stop_token_ids == {0, 2}


def test_without_an_eos_token_the_generation_config_gives_it(hf_dir):
    set_files(hf_dir, None, [2, 0])
    tok = Tokenizer.from_hf_dir(hf_dir)
    assert tok.eos_token_id == 2 and tok.stop_token_ids == {0, 2}


def test_a_gguf_stops_at_its_eos(gguf_path):
    tok = Tokenizer.from_gguf(gguf_path)
    assert tok.stop_token_ids == {tok.eos_token_id} == {2}


def test_a_gguf_stops_at_its_eot_too(gguf_path):
    from agent.tokenizer import read_tokenizer_metadata

    meta = read_tokenizer_metadata(gguf_path) | {"tokenizer.ggml.eot_token_id": 0}
    assert Tokenizer.from_metadata(meta).stop_token_ids == {0, 2}
