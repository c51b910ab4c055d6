"""Device kinds: the datasheet speed, memory and links of each accelerator we plan for.

Contract (the planner imports these names):
    DeviceKind                      frozen dataclass, SI units (bytes, bytes/s, seconds)
    load_device_catalog(path=...)   -> dict[str, DeviceKind], keyed by lower-cased name and aliases
    get_device_kind(name)           -> DeviceKind (case-insensitive; KeyError lists the choices)
    kind_for_nvml_name(name)        -> DeviceKind | None (the name NVML reports, e.g. "Tesla T4")

The numbers live in `data/devices.yaml`, one entry per kind with its datasheet address.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cost_models.paths import DATA_DIR

DEVICES_FILE = DATA_DIR / "devices.yaml"

GIB = 1024**3
GB = 10**9
TERA = 10**12


@dataclass(frozen=True)
class DeviceKind:
    """One accelerator kind: peak speed, memory, and the links it talks over."""

    name: str
    bf16_tflops: float  # dense tensor peak (FP16 where bf16_native is False)
    memory_bytes: int
    memory_bandwidth_bytes_per_s: float
    interconnect: str
    link_bandwidth_bytes_per_s: float  # to a GPU in the same node, one direction
    network_bandwidth_bytes_per_s: float  # to a device in another node, one direction
    source: str
    fp32_tflops: float = 0.0
    bf16_native: bool = True
    host_link_bandwidth_bytes_per_s: float = 32 * GB  # to host memory (PCIe), one direction
    link_latency_s: float = 10e-6
    network_latency_s: float = 50e-6
    network: str = ""
    vendor: str = "nvidia"
    aliases: tuple[str, ...] = field(default_factory=tuple)
    nvml_names: tuple[str, ...] = field(default_factory=tuple)

    def peak_flops_per_s(self, dtype_bytes: float = 2) -> float:
        """Returns the peak FLOP/s for compute in a dtype of `dtype_bytes` (4: fp32, else bf16).

        Quantised weights (int8, q4) are dequantised and multiplied in bf16, so anything
        under 4 bytes runs at the bf16 tensor peak.
        """
        if dtype_bytes >= 4 and self.fp32_tflops > 0:
            return self.fp32_tflops * TERA
        return self.bf16_tflops * TERA


def device_from_dict(entry: dict[str, Any]) -> DeviceKind:
    """Returns a DeviceKind from one YAML entry, converting GiB and GB/s to bytes and bytes/s."""
    e = dict(entry)
    kwargs: dict[str, Any] = {
        "name": e.pop("name"),
        "bf16_tflops": float(e.pop("bf16_tflops")),
        "memory_bytes": int(float(e.pop("memory_gib")) * GIB),
        "memory_bandwidth_bytes_per_s": float(e.pop("memory_bandwidth_gb_s")) * GB,
        "interconnect": e.pop("interconnect"),
        "link_bandwidth_bytes_per_s": float(e.pop("link_bandwidth_gb_s")) * GB,
        "network_bandwidth_bytes_per_s": float(e.pop("network_bandwidth_gb_s")) * GB,
        "source": e.pop("source", ""),
        "aliases": tuple(e.pop("aliases", ()) or ()),
        "nvml_names": tuple(e.pop("nvml_names", ()) or ()),
    }
    if "host_link_bandwidth_gb_s" in e:
        kwargs["host_link_bandwidth_bytes_per_s"] = float(e.pop("host_link_bandwidth_gb_s")) * GB
    for key in ("fp32_tflops", "link_latency_s", "network_latency_s"):
        if key in e:
            kwargs[key] = float(e.pop(key))
    for key in ("bf16_native", "network", "vendor"):
        if key in e:
            kwargs[key] = e.pop(key)
    if e:
        # A typo in the catalog would otherwise silently fall back to a default.
        raise ValueError(f"device {kwargs['name']!r}: unknown fields {sorted(e)}")
    return DeviceKind(**kwargs)


@functools.lru_cache(maxsize=4)
def load_device_catalog(path: Path = DEVICES_FILE) -> dict[str, DeviceKind]:
    """Returns every catalog device kind, keyed by its lower-cased name and aliases."""
    raw = yaml.safe_load(Path(path).read_text())
    catalog: dict[str, DeviceKind] = {}
    for entry in raw["devices"]:
        kind = device_from_dict(entry)
        for key in (kind.name, *kind.aliases):
            catalog[key.lower()] = kind
    return catalog


def device_names(catalog: dict[str, DeviceKind] | None = None) -> list[str]:
    """Returns the canonical names of the catalog's kinds, sorted."""
    catalog = load_device_catalog() if catalog is None else catalog
    return sorted({k.name for k in catalog.values()})


def get_device_kind(name: str) -> DeviceKind:
    """Returns the catalog kind for `name` (case-insensitive), or raises KeyError with the choices."""
    catalog = load_device_catalog()
    try:
        return catalog[name.lower()]
    except KeyError:
        raise KeyError(
            f"unknown device kind {name!r}; the catalog (data/devices.yaml) has: "
            f"{', '.join(device_names(catalog))}"
        ) from None


def kind_for_nvml_name(nvml_name: str) -> DeviceKind | None:
    """Returns the kind whose `nvml_names` holds `nvml_name` exactly, else None."""
    for kind in load_device_catalog().values():
        if nvml_name in kind.nvml_names:
            return kind
    return None
