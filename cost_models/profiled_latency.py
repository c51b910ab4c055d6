"""A kind's layer, embedding and head times at one operating point: from its measured profile
where one covers it, from the roofline elsewhere, and a record of which.

Contract (planner/build_problem.py reads these):
    OperatingCosts      seconds per layer (decode, prefill), embedding and head, and `source`
    CostSource          where the numbers came from: "profile" (file) | "calibration" | "roofline",
                        and per quantity how (measured, roofline anchored to the edge, ...)
    operating_costs(arch, device, dtype, eff, batch, decode_context, prompt_tokens,
                    profile=None, eff_origin="roofline", share=None) -> OperatingCosts
    slowdown_memory_share(profile, device) -> float   mu of the step the host slowdown was timed on

On a host whose CPU workers share its cores (`share`, cost_models/host_sharing.py) the
roofline runs with shared_efficiency(eff, share), and a measured time t (tables are measured
on a worker alone) is split by the roofline's memory term at the same operating point, m =
min(t, memory_s) with the unshared factors (latency.layer_decode_memory_s, ...):

    t_shared = m * f_m + (t - m) * f_c                  (host_sharing.shared_time_s)

the step's return_s moves no weights (m = 0: f_c); a kind defined only by measurement has no
roofline to split by and is slowed by f_m.

With a profile whose tables hold this model in this dtype:
    layer_decode_s  = decode table at (batch, decode_context)
    layer_prefill_s = prefill table at (1, prompt_tokens)
    head_*_s        = head table at rows (batch for decode, 1 for prefill)
plus, where the profile measured a real pipeline (`step`), its return_s on the head (the last
stage's step hands the result back to the engine: once per step; the step's further stages
pay hop_s each as the kind's link latency, cost_models/profile.device_kind_of);
interpolated as cost_models/profile.py says (bilinear inside the grid; outside, the roofline
anchored to the nearest measured edge, or for a kind defined only by measurement, linear
extrapolation). The roofline uses the profile's fitted factors when it has them. A kind
defined only by measurement has no roofline: its embedding lookup is costed 0 (a gather of a
few rows, well under one layer), and a profile of another model cannot describe it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cost_models import latency
from cost_models.device_catalog import DeviceKind
from cost_models.host_sharing import HostShare, shared_efficiency, shared_time_s
from cost_models.memory import dtype_bytes_of
from cost_models.model_catalog import ModelArch, get_model_arch
from cost_models.profile import INSIDE, Profile

ROOFLINE = "roofline"


@dataclass(frozen=True)
class CostSource:
    """Where one kind's costs came from: 'profile' (with its file), 'calibration' or 'roofline'."""

    kind: str
    source: str
    file: str | None = None
    how: dict[str, str] = field(default_factory=dict)  # quantity -> measured / roofline / ...
    shared: str | None = None  # how a shared CPU host slows these workers, if it does

    def describe(self) -> str:
        """Returns one line for the plan report."""
        tail = f"; {self.shared}" if self.shared else ""
        if self.source != "profile":
            return f"{self.kind}: {self.source} (no measured tables){tail}"
        parts = ", ".join(f"{q} {h}" for q, h in self.how.items())
        return f"{self.kind}: profile {self.file} - {parts}{tail}"

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {"source": self.source, "file": self.file, "how": dict(self.how)}
        if self.shared:
            out["host_sharing"] = self.shared
        return out


@dataclass(frozen=True)
class OperatingCosts:
    layer_decode_s: float
    layer_prefill_s: float
    embed_decode_s: float
    embed_prefill_s: float
    head_decode_s: float
    head_prefill_s: float
    source: CostSource


def tables_apply(profile: Profile, arch: ModelArch, dtype: str) -> bool:
    """Returns whether the profile's tables were measured on this model in this dtype."""
    return profile.model.lower() == arch.name.lower() and profile.dtype.lower() == dtype.lower()


def operating_costs(
    arch: ModelArch,
    device: DeviceKind,
    dtype: str,
    dtype_bytes: float,
    eff: latency.Efficiency,
    batch: int,
    decode_context: int,
    prompt_tokens: int,
    profile: Profile | None = None,
    eff_origin: str = ROOFLINE,
    share: HostShare | None = None,
) -> OperatingCosts:
    """Returns the kind's costs at the operating point and where each came from.

    Raises ValueError when a kind defined only by measurement has no tables for this model.
    """
    has_roofline = device.memory_bandwidth_bytes_per_s > 0
    if profile is not None and profile.efficiency is not None:
        eff = profile.efficiency
    alone = eff  # the memory terms that split a measured time are a worker's alone
    memory = {
        "decode": lambda b, c: latency.layer_decode_memory_s(
            arch, device, round(b), round(c), dtype_bytes, alone
        ),
        "prefill": lambda b, n: latency.layer_prefill_memory_s(
            arch, device, round(n), dtype_bytes, alone, batch=round(b)
        ),
        "head": lambda rows, _: latency.head_memory_s(arch, device, round(rows), dtype_bytes, alone),
    }
    if share is not None:
        eff = shared_efficiency(eff, share)
    roof = {
        "decode": lambda b, c: latency.layer_decode_s(
            arch, device, round(b), round(c), dtype_bytes, eff
        ),
        "prefill": lambda b, n: latency.layer_prefill_s(
            arch, device, round(n), dtype_bytes, eff, batch=round(b)
        ),
        "head": lambda rows, _: latency.head_s(arch, device, round(rows), dtype_bytes, eff),
    }
    use_tables = profile is not None and tables_apply(profile, arch, dtype)
    if profile is not None and not use_tables and not has_roofline:
        raise ValueError(
            f"profile {profile.path} defines kind {profile.kind!r} by tables measured on "
            f"{profile.model} {profile.dtype}, not {arch.name} {dtype}; measure this model "
            "(`pipeshift calibrate --model ... --out`) or use a catalog kind"
        )
    how: dict[str, str] = {}

    def pick(name: str, table_name: str, r: float, c: float) -> float:
        table = getattr(profile, table_name) if use_tables else None
        if table is None:
            how[name] = ROOFLINE + (" (fitted factors)" if profile and profile.efficiency else "")
            return roof[table_name](r, c)
        value, kind_of = table.at(r, c, roof[table_name] if has_roofline else None)
        how[name] = kind_of if kind_of != INSIDE else f"{INSIDE} (interpolated)"
        # tables (and the roofline anchored to their edge) are measured on a worker alone
        if share is None:
            return value
        return shared_time_s(value, share, memory[table_name](r, c) if has_roofline else None)

    decode = pick("decode", "decode", batch, decode_context)
    prefill = pick("prefill", "prefill", 1, prompt_tokens)
    head_decode = pick("head", "head", batch, 1)
    head_prefill = pick("head prefill", "head", 1, 1)
    how.pop("head prefill")
    step = profile.step if profile is not None and use_tables else {}
    if "return_s" in step:
        # to the engine and back: no weights move, it waits for a core (f_c)
        back = step["return_s"] if share is None else shared_time_s(step["return_s"], share, 0.0)
        head_decode += back
        head_prefill += back
        how["step"] = (
            f"measured on a real pipeline (return {step['return_s'] * 1e3:.1f} ms"
            + (f", hop {step['hop_s'] * 1e3:.1f} ms)" if "hop_s" in step else ")")
        )
    if has_roofline:
        embed_decode = latency.embed_s(arch, device, batch, dtype_bytes, eff)
        embed_prefill = latency.embed_s(arch, device, prompt_tokens, dtype_bytes, eff)
    else:
        embed_decode = embed_prefill = 0.0
    shared = None
    if share is not None and share.memory > 1:
        shared = (
            f"{share.busy_workers:g} busy workers share the host's cores: "
            f"compute x{share.compute:.2f}, memory x{share.memory:.2f}"
        )
    if profile is not None:
        source = CostSource(device.name, "profile", profile.path, how, shared)
    else:
        source = CostSource(device.name, eff_origin, shared=shared)
    return OperatingCosts(
        decode, prefill, embed_decode, embed_prefill, head_decode, head_prefill, source
    )


SLOWDOWN_CONTEXT = 512  # agent/profiling.SHARED_CONTEXT: decode layers timed at once, no pipeline


def slowdown_memory_share(profile: Profile, device: DeviceKind) -> float:
    """Returns mu, the memory share of the step on which the profile's host `shared_slowdown`
    was measured, by the profile's own tables and the roofline's memory terms (model and dtype
    of the profile, its fitted factors, else the kind's defaults):

        with `step` (a real pipeline, one stream at batch 1, context c = step.context):
            mu = (L * min(T_dec(1, c), M_dec(1, c)) + min(T_head(1), M_head(1)))
                 / max(tpot_1_stage_s, L * T_dec(1, c) + T_head(1))
        without (decode layers stepping at once, batch 1, context SLOWDOWN_CONTEXT):
            mu = min(T_dec(1, c), M_dec(1, c)) / T_dec(1, c)

    1 (the whole step on the bus, as before the split) where it cannot be told: no roofline,
    no decode table, a model or dtype the catalog does not know.
    """
    if device.memory_bandwidth_bytes_per_s <= 0 or profile.decode is None:
        return 1.0
    try:
        arch = get_model_arch(profile.model)
        dtype_bytes = dtype_bytes_of(profile.dtype)
    except KeyError:
        return 1.0
    eff = profile.efficiency or latency.default_efficiency(device)
    step = profile.step
    context = round(step.get("context", SLOWDOWN_CONTEXT)) if "tpot_1_stage_s" in step else SLOWDOWN_CONTEXT
    layer_s = profile.decode.at(1, context)[0]
    layer_m = min(layer_s, latency.layer_decode_memory_s(arch, device, 1, context, dtype_bytes, eff))
    if "tpot_1_stage_s" not in step:
        return max(1e-3, layer_m / layer_s)
    head_s = profile.head.at(1, 1)[0] if profile.head is not None else 0.0
    head_m = min(head_s, latency.head_memory_s(arch, device, 1, dtype_bytes, eff))
    total = max(step["tpot_1_stage_s"], arch.n_layers * layer_s + head_s)
    return min(1.0, max(1e-3, (arch.n_layers * layer_m + head_m) / total))
