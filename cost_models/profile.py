"""Measured profiles: per-layer times a device kind showed over a grid, and what they predict.

Contract:
    Table(rows, cols, seconds)              one measured grid (rows: batch; cols: context or tokens)
    Table.at(row, col, roofline=None)       -> (seconds, how) - see "Predicting" below
    Profile                                 one kind's profile: host, fit, tables, device fields
    load_profile(path)                      -> Profile, or raises ProfileError (`FILE:LINE: ...`)
    save_profile(path, profile)             writes the YAML that load_profile reads
    device_kind_of(profile, catalog_kind)   -> DeviceKind (the profile's fields over the catalog's)
    split_points(points, max_batch, max_context) -> (fit part, held-out part)
    holdout_fit(arch, device, points, ...)  -> HoldoutResult: fit on a corner of the grid,
                                               MAPE on the rest

A profile is versioned YAML (FORMAT) that `pipeshift calibrate --out PROFILE.yaml` writes:

    format: pipeshift-profile/1
    kind: cpu                 # a catalog kind (the profile overrides it where it measured)
                              # or a new name (the profile defines the kind entirely)
    model: SmolLM2-135M       # the tables hold this model's layers in this dtype
    dtype: fp32
    host: {cpu: ..., vector_extensions: [...], threads: 1, accelerator: ..., torch: ...,
           shared_workers: W, shared_slowdown: s}   # W workers stepping at once ran s x slower
    device: {memory_gib, link_bandwidth_gb_s, link_latency_s, network_bandwidth_gb_s,
             network_latency_s, host_link_bandwidth_gb_s}     # catalog units
    fit: {compute, memory, kv_memory, overhead_s, overlap, mape_pct, max_error_pct, n_points}
    decode:  {batches: [...], contexts: [...], layer_s: [[...] per batch]}  # one decode step
    prefill: {batches: [...], tokens: [...], layer_s: [[...] per batch]}    # whole prompts
    head:    {rows: [...], s: [...]}              # final norm + logits for `rows` positions
    step:    {return_s, hop_s, ...}   # a real pipeline's decode step beyond layers and head:
                                      # return_s once per step (to the engine and back),
                                      # hop_s per further stage (it becomes the kind's link
                                      # latency unless `device` gives link_latency_s)

A kind not in the catalog needs `device` (memory_gib, link_bandwidth_gb_s,
network_bandwidth_gb_s), `decode`, `prefill` and `head`; there is no roofline to fall back on.

Predicting from a table T over rows r_0 < ... < r_m and columns c_0 < ... < c_n, at (r, c):
inside the grid, bilinear interpolation in linear coordinates, with u = (r - r_i) / (r_i+1 - r_i)
and v = (c - c_j) / (c_j+1 - c_j) in the cell that holds the point:

    t = (1-u)(1-v) T[i][j] + u(1-v) T[i+1][j] + (1-u)v T[i][j+1] + uv T[i+1][j+1]

which is exact for a + b r + g c + d r c, the additive roofline's form (weights per step,
compute per sequence, KV per sequence x context). Outside the grid, with (r*, c*) the point
clamped into it:
    with a roofline R (a catalog kind):  t = R(r, c) * T(r*, c*) / R(r*, c*)
        (the roofline's shape, anchored to the nearest measured edge: continuous at the edge)
    without one (a kind defined by measurement only): the same formula with u, v beyond
        [0, 1] in the edge cell (linear extrapolation), and never below T(r*, c*) / 2.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from cost_models.device_catalog import GB, GIB, DeviceKind
from cost_models.latency import Efficiency
from cost_models.yaml_lines import YamlSyntaxError, load_with_lines

FORMAT = "pipeshift-profile/1"
INSIDE = "measured"
SCALED = "roofline anchored to the measured edge"
EXTRAPOLATED = "extrapolated linearly beyond the measured grid"

_DEVICE_FIELDS = {  # profile key -> (DeviceKind field, factor to SI units)
    "memory_gib": ("memory_bytes", GIB),
    "link_bandwidth_gb_s": ("link_bandwidth_bytes_per_s", GB),
    "link_latency_s": ("link_latency_s", 1.0),
    "network_bandwidth_gb_s": ("network_bandwidth_bytes_per_s", GB),
    "network_latency_s": ("network_latency_s", 1.0),
    "host_link_bandwidth_gb_s": ("host_link_bandwidth_bytes_per_s", GB),
}
_NEW_KIND_NEEDS = ("memory_gib", "link_bandwidth_gb_s", "network_bandwidth_gb_s")
_FIT_FIELDS = ("compute", "memory", "kv_memory", "overhead_s", "overlap")


class ProfileError(Exception):
    """A profile that cannot be used as written; `lines` are ready to print."""

    def __init__(self, lines: list[str]):
        super().__init__("\n".join(lines))
        self.lines = lines


def _locate(x: float, axis: Sequence[float]) -> tuple[int, float]:
    """Returns (i, u): the cell [axis[i], axis[i+1]] for x and x's fraction u across it
    (u outside [0, 1] beyond the ends; i = 0, u = 0 on a one-point axis)."""
    if len(axis) == 1:
        return 0, 0.0
    i = min(max(bisect.bisect_right(axis, x) - 1, 0), len(axis) - 2)
    return i, (x - axis[i]) / (axis[i + 1] - axis[i])


@dataclass(frozen=True)
class Table:
    """Measured seconds over a grid: seconds[i][j] at (rows[i], cols[j]); both axes ascending."""

    rows: tuple[float, ...]
    cols: tuple[float, ...]
    seconds: tuple[tuple[float, ...], ...]

    def _bilinear(self, r: float, c: float) -> float:
        i, u = _locate(r, self.rows)
        j, v = _locate(c, self.cols)
        t = self.seconds
        i1 = min(i + 1, len(self.rows) - 1)
        j1 = min(j + 1, len(self.cols) - 1)
        return (
            (1 - u) * (1 - v) * t[i][j]
            + u * (1 - v) * t[i1][j]
            + (1 - u) * v * t[i][j1]
            + u * v * t[i1][j1]
        )

    def contains(self, r: float, c: float) -> bool:
        return self.rows[0] <= r <= self.rows[-1] and self.cols[0] <= c <= self.cols[-1]

    def at(
        self, r: float, c: float, roofline: Callable[[float, float], float] | None = None
    ) -> tuple[float, str]:
        """Returns (seconds at (r, c), how it was obtained: INSIDE, SCALED or EXTRAPOLATED)."""
        if self.contains(r, c):
            return self._bilinear(r, c), INSIDE
        rc = min(max(r, self.rows[0]), self.rows[-1])
        cc = min(max(c, self.cols[0]), self.cols[-1])
        edge = self._bilinear(rc, cc)
        if roofline is not None:
            return roofline(r, c) * edge / roofline(rc, cc), SCALED
        return max(self._bilinear(r, c), edge / 2), EXTRAPOLATED


@dataclass(frozen=True)
class Profile:
    """One device kind's measured profile (see the module docstring for the file)."""

    path: str
    kind: str
    model: str
    dtype: str
    host: dict[str, Any] = field(default_factory=dict)
    device: dict[str, float] = field(default_factory=dict)  # catalog units, as in the file
    efficiency: Efficiency | None = None
    fit_stats: dict[str, float] = field(default_factory=dict)  # mape_pct, max_error_pct, ...
    decode: Table | None = None  # rows: batch, cols: context; per layer
    prefill: Table | None = None  # rows: batch, cols: prompt tokens; per layer
    head: Table | None = None  # rows: logit rows, one column
    step: dict[str, float] = field(default_factory=dict)  # return_s, hop_s (+ what they came from)

    def to_doc(self) -> dict[str, Any]:
        """Returns the YAML document of this profile."""
        doc: dict[str, Any] = {
            "format": FORMAT,
            "kind": self.kind,
            "model": self.model,
            "dtype": self.dtype,
            "host": dict(self.host),
        }
        if self.device:
            doc["device"] = dict(self.device)
        if self.efficiency is not None:
            eff = self.efficiency
            doc["fit"] = {
                "compute": _g(eff.compute),
                "memory": _g(eff.memory),
                "kv_memory": None if eff.kv_memory is None else _g(eff.kv_memory),
                "overhead_s": _g(eff.overhead_s),
                "overlap": eff.overlap,
                **self.fit_stats,
            }
        for name, table, col in (
            ("decode", self.decode, "contexts"),
            ("prefill", self.prefill, "tokens"),
        ):
            if table is not None:
                doc[name] = {
                    "batches": [int(x) for x in table.rows],
                    col: [int(x) for x in table.cols],
                    "layer_s": [[_g(s) for s in row] for row in table.seconds],
                }
        if self.head is not None:
            doc["head"] = {
                "rows": [int(x) for x in self.head.rows],
                "s": [_g(row[0]) for row in self.head.seconds],
            }
        if self.step:
            doc["step"] = {k: _g(v) for k, v in self.step.items()}
        return doc


def _g(x: float) -> float:
    """Returns x to 6 significant digits (measurements are not more precise than that)."""
    return float(f"{x:.6g}")


def save_profile(path: str | Path, profile: Profile) -> None:
    """Writes the profile as YAML (format FORMAT)."""
    text = yaml.safe_dump(profile.to_doc(), sort_keys=False, default_flow_style=None, width=100)
    Path(path).write_text(f"# {FORMAT}: written by `pipeshift calibrate --out`\n{text}")


# --- loading, with line numbers ---------------------------------------------------------------


class _Reader:
    """Reads fields of a profile document, collecting `FILE:LINE: field: problem` lines."""

    def __init__(self, source: str, lines: dict[tuple[Any, ...], int]):
        self.source, self.lines, self.errors = source, lines, []  # type: list[str]

    def error(self, loc: tuple[Any, ...], msg: str) -> None:
        line = next(
            (self.lines[loc[:n]] for n in range(len(loc), -1, -1) if loc[:n] in self.lines), 1
        )
        name = ".".join(str(p) for p in loc) or "(top level)"
        self.errors.append(f"{self.source}:{line}: {name}: {msg}")

    def numbers(
        self, value: Any, loc: tuple[Any, ...], positive: bool = True
    ) -> list[float] | None:
        if not isinstance(value, list) or not value:
            self.error(loc, f"give a non-empty list of numbers (got {value!r})")
            return None
        out = []
        for i, x in enumerate(value):
            if isinstance(x, bool) or not isinstance(x, int | float) or (positive and x <= 0):
                self.error((*loc, i), f"give a positive number (got {x!r})")
                return None
            out.append(float(x))
        return out

    def axis(self, value: Any, loc: tuple[Any, ...]) -> list[float] | None:
        axis = self.numbers(value, loc)
        if axis is not None and any(b <= a for a, b in zip(axis, axis[1:], strict=False)):
            self.error(loc, f"values must rise strictly (got {value}); sort them, drop repeats")
            return None
        return axis

    def table(self, doc: dict[str, Any], name: str, col_key: str) -> Table | None:
        raw = doc.get(name)
        if raw is None:
            return None
        if not isinstance(raw, dict):
            self.error((name,), f"give a mapping with batches, {col_key}, layer_s")
            return None
        unknown = sorted(set(raw) - {"batches", col_key, "layer_s"})
        if unknown:
            self.error(
                (name, unknown[0]), f"unknown fields {unknown}; use batches, {col_key}, layer_s"
            )
        rows = self.axis(raw.get("batches"), (name, "batches"))
        cols = self.axis(raw.get(col_key), (name, col_key))
        grid = raw.get("layer_s")
        if rows is None or cols is None:
            return None
        if not isinstance(grid, list) or len(grid) != len(rows):
            self.error(
                (name, "layer_s"),
                f"give one row per batch ({len(rows)} rows of {len(cols)} seconds each)",
            )
            return None
        seconds = []
        for i, row in enumerate(grid):
            values = self.numbers(row, (name, "layer_s", i))
            if values is None:
                return None
            if len(values) != len(cols):
                self.error(
                    (name, "layer_s", i),
                    f"{len(values)} values for {len(cols)} {col_key}; give one per column",
                )
                return None
            seconds.append(tuple(values))
        return Table(tuple(rows), tuple(cols), tuple(seconds))


def load_profile(path: str | Path) -> Profile:
    """Returns the profile in the YAML file `path`, or raises ProfileError (`FILE:LINE: ...`)."""
    from cost_models.device_catalog import load_device_catalog

    p = Path(path)
    source = str(p)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ProfileError([f"{source}: cannot read the profile: {exc.strerror}"]) from None
    try:
        doc, lines = load_with_lines(text, source)
    except YamlSyntaxError as exc:
        raise ProfileError([str(exc)]) from None
    if not isinstance(doc, dict):
        raise ProfileError([f"{source}:1: a profile is a mapping; see `pipeshift calibrate --out`"])
    r = _Reader(source, lines)
    if doc.get("format") != FORMAT:
        r.error(
            ("format",),
            f"expected {FORMAT!r} (got {doc.get('format')!r}); re-run `pipeshift calibrate --out`",
        )
    known = {
        "format",
        "kind",
        "model",
        "dtype",
        "host",
        "device",
        "fit",
        "decode",
        "prefill",
        "head",
        "step",
    }
    for key in sorted(set(doc) - known):
        r.error((key,), "unknown field; remove it or fix its spelling")
    for key in ("kind", "model", "dtype"):
        if not isinstance(doc.get(key), str) or not doc.get(key):
            r.error((key,), f"give a string (got {doc.get(key)!r})")
    device: dict[str, float] = {}
    raw_device = doc.get("device") or {}
    if not isinstance(raw_device, dict):
        r.error(("device",), "give a mapping of catalog fields")
        raw_device = {}
    for key, value in raw_device.items():
        if key not in _DEVICE_FIELDS:
            r.error(("device", key), f"unknown field; use {', '.join(_DEVICE_FIELDS)}")
        elif isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            r.error(("device", key), f"give a non-negative number (got {value!r})")
        else:
            device[key] = float(value)
    efficiency, stats = None, {}
    fit = doc.get("fit")
    if fit is not None:
        try:
            efficiency = Efficiency(
                compute=float(fit["compute"]),
                memory=float(fit["memory"]),
                overhead_s=float(fit["overhead_s"]),
                kv_memory=None if fit.get("kv_memory") is None else float(fit["kv_memory"]),
                overlap=bool(fit.get("overlap", True)),
            )
            stats = {k: float(v) for k, v in fit.items() if k not in _FIT_FIELDS}
        except (KeyError, TypeError, ValueError) as exc:
            r.error(
                ("fit",), f"needs numeric compute, memory, overhead_s ({exc}); re-run calibrate"
            )
    decode = r.table(doc, "decode", "contexts")
    prefill = r.table(doc, "prefill", "tokens")
    head = None
    raw_head = doc.get("head")
    if raw_head is not None:
        rows = r.axis(
            raw_head.get("rows") if isinstance(raw_head, dict) else None, ("head", "rows")
        )
        s = r.numbers(raw_head.get("s") if isinstance(raw_head, dict) else None, ("head", "s"))
        if rows is not None and s is not None:
            if len(rows) != len(s):
                r.error(("head", "s"), f"{len(s)} values for {len(rows)} rows; give one per row")
            else:
                head = Table(tuple(rows), (1.0,), tuple((x,) for x in s))
    step: dict[str, float] = {}
    raw_step = doc.get("step") or {}
    if not isinstance(raw_step, dict):
        r.error(("step",), "give a mapping: return_s, hop_s (seconds)")
        raw_step = {}
    for key, value in raw_step.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            r.error(("step", key), f"give a non-negative number of seconds (got {value!r})")
        else:
            step[key] = float(value)
    kind = doc.get("kind")
    if isinstance(kind, str) and kind.lower() not in load_device_catalog():
        missing = [k for k in _NEW_KIND_NEEDS if k not in device]
        missing += [
            k for k, t in (("decode", decode), ("prefill", prefill), ("head", head)) if t is None
        ]
        if missing:
            r.error(
                ("kind",),
                f"{kind!r} is not in the device catalog, so the profile must define it entirely: "
                f"add {', '.join(missing)} (or use a catalog kind)",
            )
    if r.errors:
        raise ProfileError(r.errors)
    return Profile(
        path=source,
        kind=str(doc["kind"]),
        model=str(doc["model"]),
        dtype=str(doc["dtype"]),
        host=dict(doc.get("host") or {}),
        device=device,
        efficiency=efficiency,
        fit_stats=stats,
        decode=decode,
        prefill=prefill,
        head=head,
        step=step,
    )


def device_kind_of(profile: Profile, catalog_kind: DeviceKind | None) -> DeviceKind:
    """Returns the kind a profile describes: the catalog's with the measured fields replaced,
    or (a kind not in the catalog) one built from the profile alone, with no roofline peaks."""
    values = {
        f: profile.device[k] * factor
        for k, (f, factor) in _DEVICE_FIELDS.items()
        if k in profile.device
    }
    if "memory_bytes" in values:
        values["memory_bytes"] = int(values["memory_bytes"])
    if "link_latency_s" not in values and "hop_s" in profile.step:
        values["link_latency_s"] = profile.step["hop_s"]  # a stage more, measured end to end
    if catalog_kind is not None:
        return replace(catalog_kind, **values)
    return DeviceKind(
        name=profile.kind,
        bf16_tflops=0.0,  # no roofline: every time comes from the profile's tables
        memory_bandwidth_bytes_per_s=0.0,
        interconnect="measured (profile)",
        source=f"profile {profile.path}",
        vendor="measured",
        **values,  # type: ignore[arg-type]
    )


# --- fitting on a corner of the grid, predicting the rest --------------------------------------


def split_points(
    points: Sequence[Any], max_batch: int, max_context: int
) -> tuple[list[Any], list[Any]]:
    """Returns (points with batch <= max_batch and context <= max_context, the others)."""
    inside = [p for p in points if p.batch <= max_batch and p.context <= max_context]
    return inside, [p for p in points if not (p.batch <= max_batch and p.context <= max_context)]


@dataclass(frozen=True)
class HoldoutResult:
    """A fit on part of a grid and how well it predicts the part it did not see."""

    fit_points: int
    held_out_points: int
    fit_mape_pct: float
    held_out_mape_pct: float
    held_out_max_error_pct: float
    efficiency: Efficiency
    rows: list[tuple[Any, float]]  # (held-out point, predicted seconds)


def holdout_fit(
    arch: Any,
    device: DeviceKind,
    points: Sequence[Any],
    dtype_bytes: float,
    overhead_s: float | None = None,
    max_batch: int = 4,
    max_context: int = 1024,
) -> HoldoutResult:
    """Returns the roofline fitted on points with batch <= max_batch and context <= max_context
    and its MAPE on the other points (context is prompt tokens for prefill points)."""
    from cost_models.calibration import fit_efficiency, mape, predict_s

    fit_part, rest = split_points(points, max_batch, max_context)
    if not fit_part or not rest:
        raise ValueError(
            f"need points on both sides of batch <= {max_batch}, context <= {max_context}; "
            f"got {len(fit_part)} inside and {len(rest)} outside"
        )
    fit = fit_efficiency(arch, device, fit_part, dtype_bytes, overhead_s=overhead_s)
    predicted = [predict_s(arch, device, p, dtype_bytes, fit.efficiency) for p in rest]
    measured = [p.measured_s for p in rest]
    errors = np.abs(np.asarray(predicted) - measured) / np.asarray(measured) * 100
    return HoldoutResult(
        fit_points=len(fit_part),
        held_out_points=len(rest),
        fit_mape_pct=fit.mape,
        held_out_mape_pct=mape(predicted, measured),
        held_out_max_error_pct=float(errors.max()),
        efficiency=fit.efficiency,
        rows=list(zip(rest, predicted, strict=True)),
    )


# --- from measurements to a profile, and back -------------------------------------------------


def _table_of(points: Sequence[Any], phase: str) -> Table | None:
    """Returns the per-layer table of one phase's points (None without points); raises
    ValueError when the points do not fill a batch x context grid."""
    cells = {(p.batch, p.context): p.measured_s / p.n_layers for p in points if p.phase == phase}
    if not cells:
        return None
    rows = sorted({b for b, _ in cells})
    cols = sorted({c for _, c in cells})
    missing = [(b, c) for b in rows for c in cols if (b, c) not in cells]
    if missing:
        raise ValueError(f"{phase} points do not fill a grid: missing (batch, context) {missing}")
    seconds = tuple(tuple(cells[(b, c)] for c in cols) for b in rows)
    return Table(tuple(map(float, rows)), tuple(map(float, cols)), seconds)


def profile_of_points(
    kind: str,
    model: str,
    dtype: str,
    host: dict[str, Any],
    points: Sequence[Any],
    fit: Any = None,
    head_s: dict[int, float] | None = None,
    memory_bytes: int | None = None,
    path: str = "",
    measured_overhead_s: float | None = None,
    step: dict[str, float] | None = None,
) -> Profile:
    """Returns the profile of measured points (cost_models.calibration.Measurement), a
    FitResult, head times by rows and a real pipeline's step overheads; memory_bytes (a
    GPU's) goes under `device`."""
    head = None
    if head_s:
        rows = sorted(head_s)
        head = Table(tuple(map(float, rows)), (1.0,), tuple((head_s[r],) for r in rows))
    return Profile(
        path=path,
        kind=kind,
        model=model,
        dtype=dtype,
        host=dict(host),
        device={} if memory_bytes is None else {"memory_gib": round(memory_bytes / GIB, 3)},
        efficiency=None if fit is None else fit.efficiency,
        fit_stats={}
        if fit is None
        else {
            "mape_pct": round(fit.mape, 2),
            "max_error_pct": round(fit.max_error_pct, 2),
            "n_points": fit.n_points,
            **(
                {}
                if measured_overhead_s is None
                else {"measured_overhead_s": _g(measured_overhead_s)}
            ),
        },
        decode=_table_of(points, "decode"),
        prefill=_table_of(points, "prefill"),
        head=head,
        step=dict(step or {}),
    )


def points_of_profile(profile: Profile) -> list[Any]:
    """Returns the profile's grid as one-layer Measurements (for fitting and checks)."""
    from cost_models.calibration import Measurement

    out = []
    for phase, table in (("decode", profile.decode), ("prefill", profile.prefill)):
        if table is None:
            continue
        for i, b in enumerate(table.rows):
            for j, c in enumerate(table.cols):
                out.append(Measurement(profile.kind, phase, int(b), int(c), 1, table.seconds[i][j]))
    return out
