"""Hugging Face directories that are not plain Llama safetensors: each is served as
transformers computes it, or refused before any worker starts with one line saying what is
not supported and what to do (never a worker's traceback, never silently wrong logits).

No downloads: configs are written by hand, models are tiny and random.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from agent.loaders import resolve_model
from planner.cli import main
from tests.agent.stage_runner import InProcessPipeline

transformers = pytest.importorskip("transformers")

LLAMA_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 256,
    "max_position_embeddings": 128,
    "hidden_act": "silu",
}


def write_dir(directory: Path, config: dict, weights: str | None = "model.safetensors") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    if weights is not None:
        (directory / weights).write_bytes(b"")
    return directory


@pytest.mark.parametrize(
    "change,named",
    [
        ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_head": 4}, "'gpt2'"),
        ({"model_type": "qwen2_moe", "architectures": ["Qwen2MoeForCausalLM"]}, "'qwen2_moe'"),
        ({"model_type": "mistral", "architectures": ["MistralForCausalLM"], "attention_bias": True},
         "attention_bias is true for model_type 'mistral'"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"attention_bias": True, "mlp_bias": True}, "mlp_bias"),
        ({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "mlp_bias": True}, "mlp_bias"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
        ({"quantization_config": {"quant_method": "gptq", "bits": 4}}, "quantized (gptq)"),
        ({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"],
          "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope scaling"),
    ],
    ids=["gpt2", "qwen2-moe", "mistral-attention-bias", "mlp-bias",
         "llama-attention-and-mlp-bias", "qwen2-mlp-bias", "gelu", "gptq", "qwen2-yarn"],
)
def test_a_config_the_runtime_would_compute_wrongly_is_refused(tmp_path, change, named):
    directory = write_dir(tmp_path / "model", {**LLAMA_CONFIG, **change})
    with pytest.raises(ValueError, match="not supported|does not load") as refusal:
        resolve_model(str(directory))
    assert named in str(refusal.value)


@pytest.mark.parametrize(
    "change,qkv_bias,o_bias,max_context",
    [
        ({"attention_bias": True}, True, True, 128),
        ({"model_type": "qwen2"}, True, False, 128),
        # Qwen2's window is off unless use_sliding_window: full attention, the whole context
        ({"model_type": "qwen2", "use_sliding_window": False, "sliding_window": 32}, True, False, 128),
        # a window as long as the context is full attention too
        ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 128}, True, False, 128),
        ({}, False, False, 128),
    ],
    ids=["llama-attention-bias", "qwen2", "qwen2-window-off", "qwen2-window-of-the-context", "llama"],
)
def test_biased_attention_is_read_from_the_config(tmp_path, change, qkv_bias, o_bias, max_context):
    arch = resolve_model(str(write_dir(tmp_path / "model", {**LLAMA_CONFIG, **change}))).arch
    assert (arch.qkv_bias, arch.o_bias, arch.max_context) == (qkv_bias, o_bias, max_context)


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2"])
def test_keys_a_config_leaves_out_take_transformers_defaults(tmp_path, model_type):
    config = {k: v for k, v in LLAMA_CONFIG.items() if k not in ("num_key_value_heads", "rms_norm_eps")}
    config["num_attention_heads"] = 64  # so that each family's default head count differs
    directory = write_dir(tmp_path / "model", {**config, "model_type": model_type})
    arch = resolve_model(str(directory)).arch
    theirs = transformers.AutoConfig.from_pretrained(directory)
    assert (arch.n_kv_heads, arch.rms_norm_eps) == (theirs.num_key_value_heads, theirs.rms_norm_eps)


def test_a_config_missing_a_llama_key_names_it(tmp_path):
    config = {k: v for k, v in LLAMA_CONFIG.items() if k != "intermediate_size"}
    with pytest.raises(ValueError, match="has no intermediate_size"):
        resolve_model(str(write_dir(tmp_path / "model", config)))


def test_pytorch_bin_weights_are_refused_saying_how_to_convert(tmp_path):
    directory = write_dir(tmp_path / "model", LLAMA_CONFIG, weights="pytorch_model.bin")
    with pytest.raises(ValueError, match="pytorch_model.bin.*only safetensors.*save_pretrained"):
        resolve_model(str(directory))


def test_an_index_naming_an_absent_shard_is_refused(tmp_path):
    directory = write_dir(tmp_path / "model", LLAMA_CONFIG, weights="model-00001-of-00002.safetensors")
    weight_map = {"model.embed_tokens.weight": "model-00001-of-00002.safetensors",
                  "lm_head.weight": "model-00002-of-00002.safetensors"}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ValueError, match="model-00002-of-00002.safetensors"):
        resolve_model(str(directory))


def test_no_weights_at_all_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        resolve_model(str(write_dir(tmp_path / "model", LLAMA_CONFIG, weights=None)))


def test_serve_refuses_bin_weights_in_one_line_before_any_worker(tmp_path, capsys):
    directory = write_dir(tmp_path / "model", LLAMA_CONFIG, weights="pytorch_model.bin")
    assert main(["serve", "--model", str(directory), "--devices", "2", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "pipeshift serve: error:" in err and "only safetensors" in err
    assert "Traceback" not in err


# ---- Mistral: Llama's decoder plus a sliding window ------------------------------------------
def mistral(directory: Path, sliding_window: int | None) -> object:
    torch.manual_seed(0)
    config = transformers.MistralConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, max_position_embeddings=128,
        sliding_window=sliding_window, initializer_range=0.2,
    )
    model = transformers.MistralForCausalLM(config).float().eval()
    model.save_pretrained(str(directory))
    return model


def logits_of(directory: Path, model, n_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 256, (n_tokens,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference = model(ids.unsqueeze(0)).logits[0].float()
    pipe = InProcessPipeline(resolve_model(str(directory)), [(0, 1), (1, 3)], block_size=4)
    return pipe.step(["r"], [0], [n_tokens], ids, all_rows=True), reference


def test_mistral_without_a_window_matches_transformers(tmp_path):
    model = mistral(tmp_path / "mistral", sliding_window=None)
    assert resolve_model(str(tmp_path / "mistral")).arch.max_context == 128
    ours, reference = logits_of(tmp_path / "mistral", model, 40)
    assert (ours - reference).abs().max().item() <= 1e-4


def test_mistral_with_a_window_serves_its_whole_context(tmp_path):
    """The window is attended as transformers does, past it too (tests/agent/test_sliding_window.py
    covers chunked prefill and decode)."""
    model = mistral(tmp_path / "mistral", sliding_window=8)
    arch = resolve_model(str(tmp_path / "mistral")).arch
    assert (arch.max_context, arch.sliding_window, arch.sliding_layers) == (128, 8, (0, 1, 2))
    ours, reference = logits_of(tmp_path / "mistral", model, 40)
    assert (ours - reference).abs().max().item() <= 1e-4
