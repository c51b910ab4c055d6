"""Shared fixtures: the real SmolLM2-135M GGUF and, once per session, transformers' model of it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def model_source():
    from agent.loaders import resolve_model

    return resolve_model("smollm2-135m")


@pytest.fixture(scope="session")
def gguf_path(model_source) -> Path:
    return Path(model_source.path)


@pytest.fixture(scope="session")
def hf_model(gguf_path):
    """transformers' own model of the same GGUF (fp32), the reference for parity."""
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="session")
def hf_tokenizer(gguf_path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
