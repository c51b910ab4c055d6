import json

import pytest

from cost_models.device_catalog import get_device_kind
from cost_models.latency import (
    CPU_EFFICIENCY,
    GPU_EFFICIENCY,
    Efficiency,
    efficiency_for,
    embed_s,
    head_s,
    hop_s,
    layer_decode_s,
    layer_prefill_s,
    load_efficiencies,
    stage_decode_s,
)
from cost_models.layer_work import layer_decode_bytes, layer_decode_flops, layer_prefill_flops
from cost_models.memory import layer_weight_bytes
from cost_models.model_catalog import get_model_arch

NO_OVERHEAD = Efficiency(compute=0.6, memory=0.8, overhead_s=0.0)


def test_decode_at_batch_1_is_memory_bound_weight_streaming():
    arch = get_model_arch("llama-2-70b")
    a100 = get_device_kind("A100-80GB")
    t = layer_decode_s(arch, a100, batch=1, context=128, eff=NO_OVERHEAD)
    weights_s = layer_weight_bytes(arch, 2) / (a100.memory_bandwidth_bytes_per_s * 0.8)
    assert t == pytest.approx(weights_s, rel=0.02)
    # Compute is far below the memory time.
    compute_s = layer_decode_flops(arch, 1, 128) / (a100.peak_flops_per_s(2) * 0.6)
    assert compute_s < 0.05 * t


def test_decode_grows_with_context_through_kv_reads():
    arch = get_model_arch("llama-2-7b")  # no GQA: KV reads are heavy
    a100 = get_device_kind("A100-40GB")
    short = layer_decode_s(arch, a100, batch=16, context=128, eff=NO_OVERHEAD)
    long = layer_decode_s(arch, a100, batch=16, context=4096, eff=NO_OVERHEAD)
    assert long > 2 * short
    extra = layer_decode_bytes(arch, 16, 4096) - layer_decode_bytes(arch, 16, 128)
    assert long - short == pytest.approx(
        extra / (a100.memory_bandwidth_bytes_per_s * 0.8), rel=1e-6
    )


def test_prefill_of_2048_tokens_is_compute_bound_on_a100():
    arch = get_model_arch("llama-3.1-8b")
    a100 = get_device_kind("A100-80GB")
    t = layer_prefill_s(arch, a100, n_tokens=2048, eff=NO_OVERHEAD)
    compute_s = layer_prefill_flops(arch, 2048) / (312e12 * 0.6)
    assert t == pytest.approx(compute_s, rel=1e-9)
    assert layer_weight_bytes(arch, 2) / (a100.memory_bandwidth_bytes_per_s * 0.8) < 0.2 * t
    # Attention's quadratic term is counted: 4 * q_size * n(n+1)/2 on top of the matmuls.
    linear = layer_prefill_flops(arch, 2048) - 4 * arch.q_size * 2048 * 2049 / 2
    assert linear == pytest.approx(2 * (arch.params_per_layer - 2 * arch.hidden_size) * 2048)


def test_faster_devices_are_faster_and_overhead_is_added_per_layer():
    arch = get_model_arch("qwen2.5-7b")
    times = [
        layer_decode_s(arch, get_device_kind(k), 8, 1024)
        for k in ("L4", "T4", "A100-80GB", "H100-SXM", "H200")
    ]
    # Decode is memory-bound: ordered by bandwidth (the L4 has 300 GB/s, the T4 320).
    assert times == sorted(times, reverse=True)
    h100 = get_device_kind("H100-SXM")
    base = layer_decode_s(arch, h100, 8, 1024, eff=NO_OVERHEAD)
    assert layer_decode_s(arch, h100, 8, 1024, eff=Efficiency(0.6, 0.8, 1e-3)) == pytest.approx(
        base + 1e-3
    )


def test_cpu_defaults_match_the_measured_smollm2_decode():
    # One CPU thread, fp32: ~51 ms per token for the whole model (30 layers + tied head).
    smol = get_model_arch("smollm2-135m")
    cpu = get_device_kind("cpu")
    t = stage_decode_s(smol, cpu, 0, 30, batch=1, context=64, dtype_bytes=4)
    assert 0.035 < t < 0.075


def test_head_and_embed():
    arch = get_model_arch("llama-3.1-8b")
    l40s = get_device_kind("L40S")
    # The head streams the vocab x hidden matrix once per step.
    head = head_s(arch, l40s, 1, eff=NO_OVERHEAD)
    assert head == pytest.approx(
        arch.embedding_params * 2 / (l40s.memory_bandwidth_bytes_per_s * 0.8), rel=0.01
    )
    assert embed_s(arch, l40s, 1, eff=NO_OVERHEAD) < head / 1000
    stage = stage_decode_s(arch, l40s, 0, 32, 1, 100)
    assert stage > 32 * layer_decode_s(arch, l40s, 1, 100) + head


def test_hop_uses_the_slower_link_and_network_across_nodes():
    arch = get_model_arch("llama-2-70b")
    a100, l40s = get_device_kind("A100-80GB"), get_device_kind("L40S")
    n_bytes = 2048 * 8192 * 2
    same = hop_s(arch, 2048, a100, l40s, same_node=True)
    assert same == pytest.approx(max(a100.link_latency_s, l40s.link_latency_s) + n_bytes / 32e9)
    across = hop_s(arch, 2048, a100, l40s, same_node=False)
    assert across == pytest.approx(l40s.network_latency_s + n_bytes / 12.5e9)
    # A single decode token is latency-dominated.
    assert hop_s(arch, 1, a100, a100, True) < 2 * a100.link_latency_s


def test_efficiencies_load_from_calibration_json(tmp_path):
    path = tmp_path / "calibration.json"
    path.write_text(
        json.dumps({"kinds": {"cpu": {"compute": 0.5, "memory": 0.7, "overhead_s": 2e-4}}})
    )
    loaded = load_efficiencies(path)
    cpu = get_device_kind("cpu")
    assert efficiency_for(cpu, loaded) == Efficiency(0.5, 0.7, 2e-4)
    assert efficiency_for(get_device_kind("L4"), loaded) == GPU_EFFICIENCY
    assert efficiency_for(cpu) == CPU_EFFICIENCY
    with pytest.raises(ValueError):
        Efficiency(compute=0.0)
