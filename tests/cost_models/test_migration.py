import pytest

from cost_models.device_catalog import get_device_kind
from cost_models.memory import kv_bytes_per_token_per_layer, layer_weight_bytes
from cost_models.migration import (
    DISK_BANDWIDTH_BYTES_PER_S,
    DISK_LATENCY_S,
    kv_move_bytes,
    kv_move_s,
    layer_move_bytes,
    layer_move_s,
)
from cost_models.model_catalog import get_model_arch
from cost_models.transfer import link_bandwidth_bytes_per_s, transfer_s


def test_layer_move_from_peer_and_from_disk():
    arch = get_model_arch("llama-2-70b")
    a100, h100 = get_device_kind("A100-80GB"), get_device_kind("H100-SXM")
    n_bytes = layer_move_bytes(arch, n_layers=4)
    assert n_bytes == 4 * layer_weight_bytes(arch, 2)
    nvlink = layer_move_s(arch, a100, h100, same_node=True, n_layers=4)
    assert nvlink == pytest.approx(a100.link_latency_s + n_bytes / 300e9)
    disk = layer_move_s(arch, None, h100, n_layers=4)
    assert disk == pytest.approx(DISK_LATENCY_S + n_bytes / DISK_BANDWIDTH_BYTES_PER_S)
    assert disk > 50 * nvlink
    # A faster disk is capped by the PCIe link into the device.
    fast = layer_move_s(
        arch, None, get_device_kind("T4"), n_layers=4, disk_bandwidth_bytes_per_s=100e9
    )
    assert fast == pytest.approx(DISK_LATENCY_S + n_bytes / 16e9)


def test_kv_move_of_an_in_flight_request():
    arch = get_model_arch("llama-3.1-8b")
    assert kv_move_bytes(arch, n_tokens=1000, n_layers=8) == 1000 * 8 * 4096
    assert kv_move_bytes(arch, 1000, 8, dtype_bytes=4) == 1000 * 8 * kv_bytes_per_token_per_layer(
        arch, 4
    )
    l4 = get_device_kind("L4")
    t = kv_move_s(arch, 1000, 8, l4, l4, same_node=False)
    assert t == pytest.approx(
        l4.network_latency_s + 1000 * 8 * 4096 / l4.network_bandwidth_bytes_per_s
    )


def test_transfer_picks_the_slower_end_and_is_free_for_nothing():
    a100, rtx = get_device_kind("A100-80GB"), get_device_kind("RTX-4090")
    assert link_bandwidth_bytes_per_s(a100, rtx, True) == rtx.link_bandwidth_bytes_per_s
    assert link_bandwidth_bytes_per_s(a100, rtx, False) == rtx.network_bandwidth_bytes_per_s
    assert transfer_s(0, a100, rtx, True) == 0.0


def test_fetch_takes_the_fastest_source_peer_link_or_disk():
    from cost_models.migration import disk_load_s, fetch_s, link_move_s
    from cost_models.transfer import Link

    a100 = get_device_kind("A100-80GB")
    n_bytes = 400e6
    fast, slow = Link(300e9, 5e-6), Link(0.125e9, 1e-4)  # NVLink-ish; 1 Gbit/s Ethernet
    assert link_move_s(n_bytes, slow) == pytest.approx(1e-4 + n_bytes / 0.125e9)
    assert fetch_s(n_bytes, a100, [slow, fast]) == pytest.approx(link_move_s(n_bytes, fast))
    # over a slow link the node reads its own disk instead
    assert fetch_s(n_bytes, a100, [slow]) == pytest.approx(disk_load_s(n_bytes, a100))
    assert fetch_s(n_bytes, a100, []) == pytest.approx(disk_load_s(n_bytes, a100))
