import sys
import types

import pytest

from cost_models import discovery
from cost_models.device_catalog import GIB


class _NVMLError(Exception):
    pass


def _fake_pynvml(gpus, init_error=None):
    """A stand-in for pynvml with the calls discovery makes."""
    mod = types.ModuleType("pynvml")
    mod.NVMLError = _NVMLError
    mod.shutdowns = 0

    def init():
        if init_error:
            raise _NVMLError(init_error)

    def shutdown():
        mod.shutdowns += 1

    mod.nvmlInit = init
    mod.nvmlShutdown = shutdown
    mod.nvmlDeviceGetCount = lambda: len(gpus)
    mod.nvmlDeviceGetHandleByIndex = lambda i: i
    mod.nvmlDeviceGetName = lambda h: gpus[h][0]
    mod.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(total=gpus[h][1])
    mod.nvmlDeviceGetUUID = lambda h: f"GPU-{h}"
    return mod


def test_without_pynvml_or_driver_falls_back_to_cpu_workers(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import raises ImportError
    found = discovery.discover_devices(n_cpu_workers=3)
    assert found.backend == "cpu" and len(found.devices) == 3
    assert {d.kind.name for d in found.devices} == {"cpu"}
    assert "pynvml not installed" in found.note and "\n" not in found.note

    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml([], "NVML Shared Library Not Found"))
    found = discovery.discover_devices(n_cpu_workers=2)
    assert found.backend == "cpu" and len(found.devices) == 2
    assert "no NVIDIA driver" in found.note


def test_gpus_are_matched_to_catalog_kinds(monkeypatch):
    fake = _fake_pynvml(
        [
            ("NVIDIA A100-SXM4-80GB", 80 * GIB),
            (b"Tesla V100-SXM2-16GB", 16 * GIB),  # old pynvml returns bytes
            ("NVIDIA H100 NVL", 94 * GIB),  # a PCIe card: the slower H100 kind
            ("NVIDIA GeForce RTX 3090", 24 * GIB),
        ]
    )
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    found = discovery.discover_devices()
    assert found.backend == "nvml"
    kinds = [(d.kind.name, d.match) for d in found.devices]
    assert kinds == [
        ("A100-80GB", "exact"),
        ("V100-32GB", "family"),
        ("H100-PCIe", "family"),
        ("T4", "assumed"),
    ]
    assert found.devices[1].memory_bytes == 16 * GIB  # measured, not the catalog's 32
    assert "RTX 3090" in found.note
    assert fake.shutdowns == 1


@pytest.mark.parametrize(
    ("name", "memory_gib", "expected"),
    [
        ("NVIDIA A100-PCIE-40GB", 40, "A100-40GB"),
        ("NVIDIA A100 80GB PCIe", 80, "A100-80GB"),
        ("NVIDIA L40S", 45, "L40S"),
        ("NVIDIA L40", 45, "L40"),
        ("NVIDIA L4", 22.5, "L4"),
        ("NVIDIA H100 PCIe", 80, "H100-PCIe"),
        ("NVIDIA H200 NVL", 141, "H200"),
    ],
)
def test_match_nvml_name(name, memory_gib, expected):
    kind, _ = discovery.match_nvml_name(name, int(memory_gib * GIB))
    assert kind.name == expected
