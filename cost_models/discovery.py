"""Which devices this host has: NVIDIA GPUs through NVML, else N local CPU workers.

Contract:
    discover_devices(n_cpu_workers=None, use_gpus=True) -> Discovery
    match_nvml_name(nvml_name, memory_bytes)            -> (DeviceKind, match)

pynvml (package `nvidia-ml-py`) is optional and imported lazily: without it, without an
NVIDIA driver (nvmlInit raises NVMLError_LibraryNotFound) or with no GPU, discovery falls
back to CPU workers and says why in one line (`Discovery.note`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

from cost_models.device_catalog import (
    DeviceKind,
    get_device_kind,
    kind_for_nvml_name,
    load_device_catalog,
)

# An unknown NVIDIA GPU is planned as the slowest catalog GPU until calibrated.
UNKNOWN_GPU_KIND = "T4"
# Datasheet suffixes that name a variant rather than a chip.
_VARIANT_TOKEN = re.compile(r"^(\d+gb|sxm\d*|pcie)$")


@dataclass(frozen=True)
class DiscoveredDevice:
    """One device found on this host."""

    index: int
    kind: DeviceKind
    reported_name: str  # what NVML calls it, or "cpu"
    memory_bytes: int  # measured total (per worker for CPU), not the catalog's
    match: str  # "exact" (NVML name in the catalog), "family", "assumed", or "cpu"
    uuid: str = ""


@dataclass
class Discovery:
    """Devices found, the backend that found them, and a one-line note on anything degraded."""

    devices: list[DiscoveredDevice] = field(default_factory=list)
    backend: str = "cpu"  # "nvml" or "cpu"
    note: str = ""


def _tokens(name: str) -> set[str]:
    return {t for t in re.split(r"[\s\-_]+", name.lower()) if t}


def match_nvml_name(nvml_name: str, memory_bytes: int) -> tuple[DeviceKind, str]:
    """Returns the catalog kind for an NVML name and how it matched.

    "exact": the name is listed under a kind's nvml_names. "family": every chip token of a
    kind's name (A100, L40S, RTX 4090 ...) appears in the NVML name; the closest memory size
    wins, then a matching variant (SXM, PCIe), then the slower kind (a safe guess). "assumed": nothing matched; the slowest catalog GPU stands in until calibration.
    """
    exact = kind_for_nvml_name(nvml_name)
    if exact is not None:
        return exact, "exact"
    reported = _tokens(nvml_name)
    candidates = []
    for kind in {k.name: k for k in load_device_catalog().values()}.values():
        chip = {t for t in _tokens(kind.name) if not _VARIANT_TOKEN.match(t)}
        if kind.vendor == "nvidia" and chip and chip <= reported:
            variant_hits = len((_tokens(kind.name) - chip) & reported)
            gap = abs(kind.memory_bytes - memory_bytes)
            candidates.append((gap, -variant_hits, kind.bf16_tflops, kind.name, kind))
    if candidates:
        return min(candidates)[-1], "family"
    return get_device_kind(UNKNOWN_GPU_KIND), "assumed"


def _host_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def cpu_devices(n_workers: int) -> list[DiscoveredDevice]:
    """Returns n_workers CPU worker devices, each with an equal share of host memory (capped by the catalog)."""
    kind = get_device_kind("cpu")
    host = _host_memory_bytes()
    share = min(kind.memory_bytes, host // n_workers) if host else kind.memory_bytes
    return [DiscoveredDevice(i, kind, "cpu", share, "cpu") for i in range(n_workers)]


def _as_str(value: Any) -> str:
    # Older pynvml returns bytes, newer returns str.
    return value.decode() if isinstance(value, bytes) else str(value)


def _nvml_devices() -> tuple[list[DiscoveredDevice], str]:
    """Returns the NVIDIA GPUs NVML sees, or ([], why not) when it cannot look."""
    try:
        import pynvml  # optional: the `nvidia-ml-py` package
    except ImportError:
        return [], "pynvml not installed (pip install 'pipeshift[gpu]')"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:  # NVMLError_LibraryNotFound without a driver
        return [], f"no NVIDIA driver ({exc})"
    try:
        found = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = _as_str(pynvml.nvmlDeviceGetName(handle))
            total = int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)
            kind, match = match_nvml_name(name, total)
            uuid = _as_str(pynvml.nvmlDeviceGetUUID(handle))
            found.append(DiscoveredDevice(i, kind, name, total, match, uuid))
        return found, "" if found else "NVML found no GPU"
    except pynvml.NVMLError as exc:
        return [], f"NVML query failed ({exc})"
    finally:
        pynvml.nvmlShutdown()


def discover_devices(n_cpu_workers: int | None = None, use_gpus: bool = True) -> Discovery:
    """Returns this host's GPUs via NVML, or n_cpu_workers CPU workers (default: cores) when none."""
    reason = "GPUs not requested"
    if use_gpus:
        gpus, reason = _nvml_devices()
        if gpus:
            guessed = [d.reported_name for d in gpus if d.match == "assumed"]
            note = (
                f"not in the device catalog, planned as {UNKNOWN_GPU_KIND} until calibrated: "
                f"{', '.join(guessed)}"
                if guessed
                else ""
            )
            return Discovery(gpus, "nvml", note)
    n = n_cpu_workers or os.cpu_count() or 1
    return Discovery(cpu_devices(n), "cpu", f"{reason}; using {n} CPU worker(s)")
