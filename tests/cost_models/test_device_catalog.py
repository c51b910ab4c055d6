import pytest

from cost_models.device_catalog import (
    GB,
    GIB,
    device_names,
    get_device_kind,
    kind_for_nvml_name,
    load_device_catalog,
)

REQUIRED = [
    "A100-40GB",
    "A100-80GB",
    "L40S",
    "L40",
    "L4",
    "A10G",
    "T4",
    "V100-32GB",
    "H100-SXM",
    "H100-PCIe",
    "H200",
    "RTX-4090",
    "MI300X",
    "cpu",
]


def test_catalog_has_every_required_kind_with_a_source_and_sane_numbers():
    names = device_names()
    for name in REQUIRED:
        assert name in names
    for kind in {k.name: k for k in load_device_catalog().values()}.values():
        assert kind.source, kind.name
        assert kind.bf16_tflops > 0 and kind.memory_bytes > 0
        assert kind.memory_bandwidth_bytes_per_s > 0
        assert kind.link_bandwidth_bytes_per_s > 0 and kind.network_bandwidth_bytes_per_s > 0
        if kind.vendor != "cpu":
            assert kind.source.startswith("https://"), kind.name


def test_datasheet_numbers_are_dense_and_converted_to_si_units():
    a100 = get_device_kind("A100-80GB")
    assert a100.bf16_tflops == 312  # dense, not the 624 sparse figure
    assert a100.memory_bytes == 80 * GIB
    assert a100.memory_bandwidth_bytes_per_s == 2039 * GB
    h100 = get_device_kind("h100-sxm")
    assert h100.bf16_tflops == pytest.approx(989.4)
    assert h100.memory_bandwidth_bytes_per_s == 3350 * GB
    assert get_device_kind("H200").memory_bytes == 141 * GIB
    assert get_device_kind("MI300X").memory_bytes == 192 * GIB
    # Hopper NVLink is faster than Ampere's, and both beat PCIe-only cards.
    assert h100.link_bandwidth_bytes_per_s > a100.link_bandwidth_bytes_per_s
    assert a100.link_bandwidth_bytes_per_s > get_device_kind("L40S").link_bandwidth_bytes_per_s


def test_cpu_worker_is_an_honest_single_core():
    cpu = get_device_kind("cpu")
    assert 0.01 <= cpu.fp32_tflops <= 0.2
    assert 5 * GB <= cpu.memory_bandwidth_bytes_per_s <= 30 * GB
    assert cpu.peak_flops_per_s(4) == cpu.fp32_tflops * 1e12


def test_fp32_uses_the_fp32_peak_and_quantised_weights_the_bf16_peak():
    l4 = get_device_kind("L4")
    assert l4.peak_flops_per_s(4) == pytest.approx(30.3e12)
    assert l4.peak_flops_per_s(2) == pytest.approx(121e12)
    assert l4.peak_flops_per_s(0.5625) == pytest.approx(121e12)


def test_lookup_is_case_insensitive_and_unknown_names_list_the_choices():
    assert get_device_kind("a100") is get_device_kind("A100-40GB")
    assert get_device_kind("RTX 4090").name == "RTX-4090"
    with pytest.raises(KeyError, match="L40S"):
        get_device_kind("B200")


def test_nvml_names_map_to_kinds():
    assert kind_for_nvml_name("Tesla T4").name == "T4"
    assert kind_for_nvml_name("NVIDIA H100 80GB HBM3").name == "H100-SXM"
    assert kind_for_nvml_name("NVIDIA B200") is None
