"""Fit a device kind's Efficiency factors to measured layer timings, and keep them in JSON.

Contract:
    Measurement(kind, phase, batch, context, n_layers, measured_s)
        phase "decode": one step of `batch` sequences with `context` cached tokens each;
        phase "prefill": `batch` prompts of `context` tokens each. Times cover n_layers
        decoder blocks only (no embedding, no head).
    predict_s(arch, device, m, dtype_bytes=2, eff=None)        -> float
    fit_efficiency(arch, device, points, dtype_bytes=2)        -> FitResult
    fit_all(arch, points, dtype_bytes=2)                       -> dict[kind name, FitResult]
    mape(predicted, measured)                                  -> float (percent)
    save_calibration(path, arch, fits, dtype_bytes, points)    writes the JSON that
        cost_models.latency.load_efficiencies reads back.

The fit: the roofline is n_layers * (combine(F / (P c), B / (W m) + K / (W kv)) + o), with F the
FLOPs, B the weight and hidden-state bytes and K the KV-cache bytes of one layer. For every
(c, m, kv) on a log grid the best overhead o >= 0 has a closed form (weighted least squares
on relative error, so a 1 ms point counts as much as a 1 s one); the grid is then refined
around the best cell. combine is max (compute and memory traffic overlap, as on GPUs) or
the sum (one CPU core does both in turn); both are fitted and the better one kept. A tiny
pull towards the defaults decides a factor the points cannot
(compute when every point is memory-bound; kv follows m when no point has much KV).
With one model, weight streaming (B / (W m)) and overhead (o) are both constant per layer,
so noise can move time between m and o without changing any prediction for that model;
a separately measured overhead (`overhead_s=`, as `pipeshift calibrate` measures on tiny
layers) or points from models of other layer sizes separate them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from cost_models.device_catalog import DeviceKind, get_device_kind
from cost_models.latency import Efficiency, default_efficiency, layer_decode_s, layer_prefill_s
from cost_models.layer_work import (
    layer_decode_dense_bytes,
    layer_decode_flops,
    layer_decode_kv_bytes,
    layer_prefill_dense_bytes,
    layer_prefill_flops,
    layer_prefill_kv_bytes,
)
from cost_models.model_catalog import ModelArch

FORMAT = "pipeshift-calibration/1"
_GRID_LOW, _GRID_HIGH, _GRID_STEPS = 0.005, 4.0, 60  # the CPU peak is a guess: allow > 1
_PRIOR_WEIGHT = 1e-6


@dataclass(frozen=True)
class Measurement:
    """One timed run of n_layers decoder blocks on one device kind."""

    kind: str
    phase: str  # "decode" | "prefill"
    batch: int
    context: int
    n_layers: int
    measured_s: float

    def __post_init__(self) -> None:
        if self.phase not in ("decode", "prefill"):
            raise ValueError(f"phase must be 'decode' or 'prefill', got {self.phase!r}")
        if self.measured_s <= 0:
            raise ValueError(f"measured_s must be positive, got {self.measured_s}")


@dataclass(frozen=True)
class FitResult:
    """Fitted factors of one device kind and how well they explain the points."""

    kind: str
    efficiency: Efficiency
    mape: float  # percent
    max_error_pct: float
    n_points: int


def _work(arch: ModelArch, m: Measurement, dtype_bytes: float) -> tuple[float, float, float]:
    """Returns (flops, dense bytes, KV bytes) of one layer for a measurement."""
    if m.phase == "decode":
        return (
            layer_decode_flops(arch, m.batch, m.context),
            layer_decode_dense_bytes(arch, m.batch, dtype_bytes),
            layer_decode_kv_bytes(arch, m.batch, m.context, dtype_bytes),
        )
    return (
        layer_prefill_flops(arch, m.context, m.batch),
        layer_prefill_dense_bytes(arch, m.context, dtype_bytes, m.batch),
        layer_prefill_kv_bytes(arch, m.context, dtype_bytes, m.batch),
    )


def predict_s(
    arch: ModelArch,
    device: DeviceKind,
    m: Measurement,
    dtype_bytes: float = 2,
    eff: Efficiency | None = None,
) -> float:
    """Returns the model's seconds for a measurement's run: n_layers * layer time."""
    if m.phase == "decode":
        return m.n_layers * layer_decode_s(arch, device, m.batch, m.context, dtype_bytes, eff)
    return m.n_layers * layer_prefill_s(arch, device, m.context, dtype_bytes, eff, batch=m.batch)


def mape(predicted: Sequence[float], measured: Sequence[float]) -> float:
    """Returns the mean absolute percentage error of predicted against measured."""
    p, y = np.asarray(predicted, float), np.asarray(measured, float)
    return float(np.mean(np.abs(p - y) / y) * 100)


@dataclass(frozen=True)
class _Points:
    """Each point's seconds at efficiency 1, split by what limits it, and the measured seconds."""

    compute_s1: np.ndarray  # n_layers * F / P
    dense_s1: np.ndarray  # n_layers * dense bytes / W
    kv_s1: np.ndarray  # n_layers * KV bytes / W
    n_layers: np.ndarray
    y: np.ndarray


def _best_on_grid(
    pts: _Points,
    cs: np.ndarray,
    ms: np.ndarray,
    kvs: np.ndarray,
    prior: Efficiency,
    fixed_overhead_s: float | None = None,
    overlap: bool = True,
) -> tuple[float, float, float, float]:
    """Returns (c, m, kv, o) minimising the sum of squared relative errors over cs x ms x kvs."""
    n, y = pts.n_layers[:, None, None], pts.y[:, None, None]
    w = 1.0 / y
    compute = pts.compute_s1[:, None, None] / cs[None, :, None]  # (N, C, 1)
    best: tuple[float, float, float, float, float] | None = None
    for kv in kvs:
        memory = pts.dense_s1[:, None, None] / ms[None, None, :] + pts.kv_s1[:, None, None] / kv
        roof = np.maximum(compute, memory) if overlap else compute + memory  # (N, C, M)
        # d/do sum(((roof + n o - y) / y)^2) = 0  ->  o = sum(n (y - roof) / y^2) / sum(n^2 / y^2)
        if fixed_overhead_s is None:
            o = np.sum(n * (y - roof) * w**2, axis=0) / np.sum((n * w) ** 2, axis=0)
            o = np.maximum(o, 0.0)
        else:
            o = np.full(roof.shape[1:], fixed_overhead_s)
        loss = np.sum(((roof + n * o[None] - y) * w) ** 2, axis=0)
        # Undetermined factors stay near the defaults; an undetermined kv follows m.
        loss += _PRIOR_WEIGHT * (
            np.log(cs[:, None] / prior.compute) ** 2
            + np.log(ms[None, :] / prior.memory) ** 2
            + np.log(kv / ms[None, :]) ** 2
        )
        ic, im = np.unravel_index(int(np.argmin(loss)), loss.shape)
        if best is None or loss[ic, im] < best[0]:
            best = (float(loss[ic, im]), float(cs[ic]), float(ms[im]), float(kv), float(o[ic, im]))
    assert best is not None
    return best[1], best[2], best[3], best[4]


def fit_efficiency(
    arch: ModelArch,
    device: DeviceKind,
    points: Sequence[Measurement],
    dtype_bytes: float = 2,
    overhead_s: float | None = None,
) -> FitResult:
    """Returns the Efficiency that best explains `points` (all of one kind) and its error.

    overhead_s, when given (measured on layers too small to cost anything else), is kept
    instead of fitted; that separates it from weight streaming (see the module docstring).
    """
    if not points:
        raise ValueError(f"no measurements for {device.name}")
    work = np.array([_work(arch, m, dtype_bytes) for m in points])
    n_layers = np.array([m.n_layers for m in points], float)
    bandwidth = device.memory_bandwidth_bytes_per_s
    pts = _Points(
        compute_s1=n_layers * work[:, 0] / device.peak_flops_per_s(dtype_bytes),
        dense_s1=n_layers * work[:, 1] / bandwidth,
        kv_s1=n_layers * work[:, 2] / bandwidth,
        n_layers=n_layers,
        y=np.array([m.measured_s for m in points], float),
    )
    prior = default_efficiency(device)

    # Whether the device overlaps compute with memory traffic is decided by the points too.
    candidates = []
    for overlap in (True, False):
        grid = np.geomspace(_GRID_LOW, _GRID_HIGH, _GRID_STEPS)
        c, m, kv, o = _best_on_grid(pts, grid, grid, grid[::2], prior, overhead_s, overlap)
        for span, steps in ((1.2, 21), (1.03, 21), (1.004, 11)):  # zoom in around the best cell
            zoom = np.geomspace(1 / span, span, steps)
            c, m, kv, o = _best_on_grid(
                pts, c * zoom, m * zoom, kv * zoom, prior, overhead_s, overlap
            )
        eff = Efficiency(compute=c, memory=m, overhead_s=o, kv_memory=kv, overlap=overlap)
        predicted = np.asarray([predict_s(arch, device, p, dtype_bytes, eff) for p in points])
        candidates.append((float(np.sum(((predicted - pts.y) / pts.y) ** 2)), eff, predicted))
    _, eff, predicted = min(candidates, key=lambda c: c[0])
    errors = np.abs(predicted - pts.y) / pts.y * 100
    return FitResult(device.name, eff, mape(predicted, pts.y), float(errors.max()), len(points))


def fit_all(
    arch: ModelArch, points: Iterable[Measurement], dtype_bytes: float = 2
) -> dict[str, FitResult]:
    """Returns one FitResult per device kind found in `points`."""
    by_kind: dict[str, list[Measurement]] = {}
    for p in points:
        by_kind.setdefault(get_device_kind(p.kind).name, []).append(p)
    return {
        name: fit_efficiency(arch, get_device_kind(name), pts, dtype_bytes)
        for name, pts in by_kind.items()
    }


def save_calibration(
    path: str | Path,
    arch: ModelArch,
    fits: dict[str, FitResult],
    dtype_bytes: float,
    points: Sequence[Measurement] = (),
) -> None:
    """Writes fitted factors (and the points behind them) as JSON for load_efficiencies."""
    doc = {
        "format": FORMAT,
        "model": arch.name,
        "dtype_bytes": dtype_bytes,
        "kinds": {
            name: {
                **asdict(fit.efficiency),
                "mape_pct": fit.mape,
                "max_error_pct": fit.max_error_pct,
                "n_points": fit.n_points,
            }
            for name, fit in fits.items()
        },
        "points": [asdict(p) for p in points],
    }
    Path(path).write_text(json.dumps(doc, indent=2) + "\n")
