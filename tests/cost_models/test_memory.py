import pytest

from cost_models.device_catalog import GIB, get_device_kind
from cost_models.memory import (
    dtype_bytes_of,
    embedding_bytes,
    head_bytes,
    kv_bytes_per_token_per_layer,
    layer_weight_bytes,
    stage_fits,
    stage_memory,
    stage_memory_bytes,
)
from cost_models.model_catalog import get_model_arch


def test_llama2_70b_weights_are_about_129_gib_in_bf16():
    arch = get_model_arch("llama-2-70b")
    total = stage_memory(arch, 0, arch.n_layers, batch=0, context=0)
    weights = total.weights_bytes + total.embedding_bytes + total.head_bytes
    assert weights / GIB == pytest.approx(128.5, rel=0.03)


def test_quantisation_scales_weight_bytes():
    arch = get_model_arch("llama-3.1-8b")
    bf16 = layer_weight_bytes(arch, dtype_bytes_of("bf16"))
    assert layer_weight_bytes(arch, dtype_bytes_of("fp32")) == 2 * bf16
    assert layer_weight_bytes(arch, dtype_bytes_of("int8")) == bf16 // 2
    assert layer_weight_bytes(arch, dtype_bytes_of("q4")) == pytest.approx(
        bf16 * 4.5 / 16, rel=1e-6
    )
    with pytest.raises(KeyError, match="q4"):
        dtype_bytes_of("fp6")


def test_kv_bytes_per_token():
    # Llama-3.1-8B: 32 layers x K,V x 8 KV heads x 128 x 2 B = 128 KiB per token.
    arch = get_model_arch("llama-3.1-8b")
    assert arch.n_layers * kv_bytes_per_token_per_layer(arch, 2) == 128 * 1024
    # SmolLM2-135M in fp32: 45 KiB per token (measured on the real cache).
    smol = get_model_arch("smollm2-135m")
    assert smol.n_layers * kv_bytes_per_token_per_layer(smol, 4) == 45 * 1024


def test_tied_head_needs_its_own_copy_unless_the_stage_also_embeds():
    smol = get_model_arch("smollm2-135m")
    assert head_bytes(smol, 2, has_embedding=True) == smol.hidden_size * 2
    assert (
        head_bytes(smol, 2, has_embedding=False) == embedding_bytes(smol, 2) + smol.hidden_size * 2
    )
    one = stage_memory(smol, 0, 30, batch=1, context=1)
    first = stage_memory(smol, 0, 15, batch=1, context=1)
    last = stage_memory(smol, 15, 30, batch=1, context=1)
    assert first.head_bytes == 0 and last.embedding_bytes == 0
    assert first.weights_bytes + last.weights_bytes + first.embedding_bytes + last.head_bytes > (
        one.weights_bytes + one.embedding_bytes + one.head_bytes
    )


def test_stage_memory_counts_kv_for_its_layers_only():
    arch = get_model_arch("llama-2-7b")
    m = stage_memory(arch, 8, 16, batch=4, context=1000)
    assert m.kv_bytes == 4 * 1000 * 8 * kv_bytes_per_token_per_layer(arch, 2)
    assert m.embedding_bytes == 0 and m.head_bytes == 0
    assert stage_memory_bytes(arch, 8, 16, 4, 1000) == m.total_bytes
    with pytest.raises(ValueError, match="32 layers"):
        stage_memory(arch, 30, 33, 1, 1)


def test_stage_fits():
    arch = get_model_arch("llama-2-70b")
    a100 = get_device_kind("A100-80GB")
    whole = stage_fits(arch, a100, 0, 80, batch=1, context=1024)
    assert not whole.fits and whole.free_bytes < 0
    half = stage_fits(arch, a100, 0, 40, batch=8, context=2048)
    assert half.fits and half.capacity_bytes == int(80 * GIB * 0.9)
    assert half.free_bytes == half.capacity_bytes - half.memory.total_bytes
    assert get_device_kind("MI300X").memory_bytes > whole.memory.total_bytes
