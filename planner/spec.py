"""The spec file: what to serve, on what, for which workload and SLOs (pydantic at the door).

`load_spec(path)` returns a validated `Spec`, or raises `SpecError` whose lines read
`FILE:LINE: field.path: what is wrong; what to do`. Lines come from the YAML nodes' marks.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from cost_models.device_catalog import get_device_kind
from cost_models.model_catalog import get_model_arch
from cost_models.profile import Profile, ProfileError, load_profile
from cost_models.yaml_lines import YamlSyntaxError, load_with_lines

DTYPE_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "int8": 1.0, "q4": 0.5625}


class SpecError(Exception):
    """A spec that cannot be planned as written; `lines` are ready to print."""

    def __init__(self, lines: list[str]):
        super().__init__("\n".join(lines))
        self.lines = lines


class _Strict(BaseModel):
    # .inf / .nan in YAML are no rate, size or SLO (an infinite rate planned "inf tok/s")
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class DeviceGroup(_Strict):
    kind: str
    count: int = Field(1, ge=1, le=4096)
    node: str = "node0"
    names: list[str] | None = None  # default: NODE/KIND.i

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, v: str, info: ValidationInfo) -> str:
        # kinds the spec's profiles define (parse_spec passes them in the context)
        defined = (info.context or {}).get("profile_kinds", {})
        try:
            return get_device_kind(v).name
        except KeyError as exc:
            if v.lower() in defined:
                return str(defined[v.lower()])
            raise ValueError(f"{exc.args[0]}; or define the kind in a `profiles` file") from None

    @model_validator(mode="after")
    def _names_match_count(self) -> DeviceGroup:
        if self.names is not None and len(self.names) != self.count:
            raise ValueError(
                f"names lists {len(self.names)} devices but count is {self.count}; "
                "give one name per device or drop `names`"
            )
        return self


class NodeSpec(_Strict):
    """A host: its network card, and optionally its GPU-to-GPU link if not the catalog's.

    Units are the ones network people use: Gbit/s and microseconds.
    """

    name: str
    nic_gbps: float = Field(gt=0)  # one direction, Gbit/s
    nic_latency_us: float = Field(10.0, ge=0)
    region: str | None = None  # nodes of one region may share `links` entries
    intra_gbps: float | None = Field(None, gt=0)  # default: the catalog kinds' link
    intra_latency_us: float | None = Field(None, ge=0)
    # CPU workers on this host share its cores and memory bus (cost_models/host_sharing.py)
    cpu_cores: int | None = Field(None, ge=1, le=4096)
    threads_per_worker: int = Field(1, ge=1, le=4096)
    memory_gb_s: float | None = Field(None, gt=0)  # host memory bus; default: not the limit


class LinkSpec(_Strict):
    """The path between two nodes (or between every node of two regions), where it is not
    simply the slower of the two NICs: a slow WAN link, a switch with less capacity."""

    between: list[str] = Field(min_length=2, max_length=2)  # node or region names
    gbps: float = Field(gt=0)
    latency_us: float = Field(ge=0)


class LengthDistribution(_Strict):
    """Token counts of a request: a mean and any of the percentiles."""

    mean: float = Field(gt=0)
    p50: float | None = Field(None, gt=0)
    p90: float | None = Field(None, gt=0)
    p95: float | None = Field(None, gt=0)
    p99: float | None = Field(None, gt=0)
    max: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _percentiles_in_order(self) -> LengthDistribution:
        given = [(k, v) for k, v in (("p50", self.p50), ("p90", self.p90), ("p95", self.p95),
                                     ("p99", self.p99), ("max", self.max)) if v is not None]
        for (lo, a), (hi, b) in zip(given, given[1:], strict=False):
            if a > b:
                raise ValueError(
                    f"{lo} {a:g} is above {hi} {b:g}: a higher percentile cannot be shorter; "
                    "fix the figures"
                )
        if self.max is not None and self.mean > self.max:
            raise ValueError(f"mean {self.mean:g} is above max {self.max:g}; fix the figures")
        return self

    def quantile(self, percentile: float) -> float:
        """Returns the least given percentile at or above `percentile` (max, then mean, else)."""
        for q, value in ((50, self.p50), (90, self.p90), (95, self.p95), (99, self.p99)):
            if value is not None and q >= percentile:
                return value
        return self.max if self.max is not None else self.mean


class Workload(_Strict):
    request_rate_per_s: float = Field(1.0, gt=0)
    prompt_tokens: LengthDistribution | int | None = None
    output_tokens: LengthDistribution | int | None = None
    # CSV or JSONL with prompt_tokens, output_tokens per request (or Azure's ContextTokens,
    # GeneratedTokens)
    trace: str | None = None
    batch: int = Field(8, ge=1, le=4096)  # sequences per micro-batch

    @model_validator(mode="after")
    def _lengths_given(self) -> Workload:
        if self.trace is None and (self.prompt_tokens is None or self.output_tokens is None):
            raise ValueError("give `prompt_tokens` and `output_tokens`, or a `trace` file")
        return self


class Slo(_Strict):
    ttft_ms: float | None = Field(None, gt=0)
    ttft_percentile: float = Field(99, gt=0, le=100)
    tpot_ms: float | None = Field(None, gt=0)
    tpot_percentile: float = Field(99, gt=0, le=100)

    @field_validator("ttft_percentile", "tpot_percentile")
    @classmethod
    def _out_of_100(cls, value: float) -> float:
        # 0.99 would be the 0.99th percentile: a fraction written for p99, never an SLO's aim
        if value < 1:
            raise ValueError(
                f"{value:g} is out of 100, the {value:g}th percentile; give the percentile out "
                "of 100 (99 for p99)"
            )
        return value


class StageSpec(BaseModel):
    model_config = ConfigDict(extra="ignore")  # a plan's JSON output may be fed back
    device: str
    start: int = Field(ge=0)
    end: int = Field(ge=1)


class PipelineSpec(BaseModel):
    model_config = ConfigDict(extra="ignore")
    stages: list[StageSpec] = Field(min_length=1)


class CurrentConfig(BaseModel):
    model_config = ConfigDict(extra="ignore")
    pipelines: list[PipelineSpec] = Field(default_factory=list)


class Pins(_Strict):
    exclude_devices: list[str] = Field(default_factory=list)  # never use these
    keep_current: list[int] = Field(default_factory=list)  # current pipelines that must stay


DType = Literal["fp32", "bf16", "fp16", "int8", "q4"]


class ModelEntry(_Strict):
    """One of several models sharing the pool: its own workload, SLOs and weight."""

    name: str | None = Field(None, min_length=1, max_length=100)  # default: the model's name
    model: str
    workload: Workload
    slo: Slo = Field(default_factory=Slo)
    weight: float = Field(1.0, gt=0, le=1e6)  # value of one of its tokens/s (planner/master.py)
    dtype: DType | None = None  # default: the spec's

    @field_validator("model")
    @classmethod
    def _known_model(cls, v: str) -> str:
        try:
            return get_model_arch(v).name
        except KeyError as exc:
            raise ValueError(str(exc.args[0])) from None


class Spec(_Strict):
    # one model: `model` and `workload` (and `slo`); several on one pool: `models`
    model: str | None = None
    models: list[ModelEntry] | None = Field(None, min_length=1, max_length=16)
    dtype: DType = "bf16"
    devices: list[DeviceGroup] = Field(min_length=1)
    # topology: with `nodes`, each hop is costed on the link it uses (planner/topology.py);
    # without, every hop is costed at the slowest link of the cluster
    nodes: list[NodeSpec] | None = None
    links: list[LinkSpec] = Field(default_factory=list)
    workload: Workload | None = None
    slo: Slo = Field(default_factory=Slo)
    objective: Literal["max_throughput", "min_devices"] = "max_throughput"
    memory_utilization: float = Field(0.9, gt=0, le=1)
    max_stages: int = Field(16, ge=1, le=256)
    replan_interval_s: float = Field(600.0, gt=0)
    # the live controller of `pipeshift serve --spec` (agent/controller_runner.py): auto applies
    # the re-plans that pay back, propose records them for `pipeshift apply`, off does neither
    controller: Literal["auto", "propose", "off"] = "off"
    calibration: str | None = None  # `pipeshift calibrate` JSON: measured efficiency per kind
    # `pipeshift calibrate --out X.yaml` profiles (relative to the spec): measured tables that
    # replace a catalog kind's roofline where they cover it, or define a new kind entirely
    profiles: list[str] = Field(default_factory=list)
    current: CurrentConfig | None = None
    pins: Pins = Field(default_factory=Pins)
    base_dir: str = Field(".", exclude=True)  # where relative paths (trace) resolve

    @field_validator("model")
    @classmethod
    def _known_model(cls, v: str | None) -> str | None:
        if v is None:
            return None
        try:
            return get_model_arch(v).name
        except KeyError as exc:
            raise ValueError(str(exc.args[0])) from None

    @model_validator(mode="after")
    def _one_form(self) -> Spec:
        if self.models is None:
            if self.model is None or self.workload is None:
                raise ValueError(
                    "give `model` and `workload` for one model, or a `models` list for several"
                )
            return self
        if self.model is not None or self.workload is not None:
            raise ValueError(
                "give either `model` and `workload` (one model) or `models` (several), not both; "
                "move the model into the `models` list"
            )
        labels = self.model_labels()
        dupes = sorted({x for x in labels if labels.count(x) > 1})
        if dupes:
            raise ValueError(
                f"models: {', '.join(dupes)} appear twice; give each entry its own `name`"
            )
        if self.current is not None and self.current.pipelines or self.pins.keep_current:
            raise ValueError(
                "`current` and `pins.keep_current` plan a change of one model's deployment; "
                "drop them with several `models`"
            )
        return self

    def model_labels(self) -> list[str]:
        """Returns each model entry's name (its `name`, else the model's)."""
        return [e.name or e.model for e in self.models or []]

    def single_model_specs(self) -> list[Spec]:
        """Returns one single-model spec per `models` entry, over the same devices."""
        out = []
        for e in self.models or []:
            out.append(
                self.model_copy(
                    update={
                        "model": e.model,
                        "workload": e.workload,
                        "slo": e.slo,
                        "dtype": e.dtype or self.dtype,
                        "models": None,
                    }
                )
            )
        return out

    @property
    def dtype_bytes(self) -> float:
        return DTYPE_BYTES[self.dtype]

    def device_names(self) -> list[tuple[str, str, str]]:
        """Returns (name, kind, node) of every device, in spec order."""
        out = []
        seen: dict[tuple[str, str], int] = {}
        for group in self.devices:
            for i in range(group.count):
                if group.names is not None:
                    name = group.names[i]
                else:
                    j = seen.get((group.node, group.kind), 0)
                    seen[(group.node, group.kind)] = j + 1
                    name = f"{group.node}/{group.kind}.{j}"
                out.append((name, group.kind, group.node))
        return out

    def lengths(self) -> tuple[LengthDistribution, LengthDistribution]:
        """Returns the prompt and output length distributions (from the trace when given)."""
        if self.workload is None:
            raise SpecError(["this spec lists several `models`; each has its own workload"])
        if self.workload.trace is not None:
            return _trace_lengths(Path(self.base_dir) / self.workload.trace)
        return _as_dist(self.workload.prompt_tokens), _as_dist(self.workload.output_tokens)


def _as_dist(value: LengthDistribution | int | None) -> LengthDistribution:
    if isinstance(value, LengthDistribution):
        return value
    assert value is not None
    return LengthDistribution(mean=float(value))


def _trace_lengths(path: Path) -> tuple[LengthDistribution, LengthDistribution]:
    from planner.trace import (  # reads SpecError here
        TRACE_FORMATS,
        find_columns,
        read_rows,
        token_count,
    )

    if not path.exists():
        raise SpecError([f"{path}: trace file not found; give a path relative to the spec"])
    columns, rows = read_rows(path)
    if not rows:
        raise SpecError([f"{path}: trace has no requests"])
    # Only the lengths are read: the prompt and output columns of either format, no arrivals.
    named = next((n for f in TRACE_FORMATS if (n := find_columns(columns, f[1:])) is not None), None)
    if named is None:
        wanted = " or ".join(", ".join(f[1:]) for f in TRACE_FORMATS)
        raise SpecError([f"{path}: every row needs the token counts {wanted}; it has {', '.join(columns)}"])

    def dist(column: str) -> LengthDistribution:
        values = []
        for line, row in rows:
            try:
                # at least 1, as the simulator counts an empty prompt
                values.append(float(max(1, token_count(row.get(column), column))))
            except ValueError as exc:
                raise SpecError([f"{path}:{line}: {exc}; fix or remove the row"]) from None
        values.sort()

        def q(p: float) -> float:
            return values[min(len(values) - 1, math.ceil(p / 100 * len(values)) - 1)]

        return LengthDistribution(
            mean=sum(values) / len(values),
            p50=q(50),
            p90=q(90),
            p95=q(95),
            p99=q(99),
            max=values[-1],
        )

    return dist(named[0]), dist(named[1])


# --- YAML with line numbers ---------------------------------------------------------------


_HINTS = {
    "missing": "add it",
    "extra_forbidden": "remove it or fix its spelling",
    "int_parsing": "give a whole number",
    "int_type": "give a whole number",
    "float_parsing": "give a number",
    "float_type": "give a number",
    "string_type": "give a string",
    "list_type": "give a list",
    "model_type": "give a mapping of fields",
    "literal_error": "use one of the listed values",
    "greater_than": "raise it",
    "greater_than_equal": "raise it",
    "less_than": "lower it",
    "less_than_equal": "lower it",
    "too_short": "add entries",
    "finite_number": "give a finite number",
}


def _format_error(source: str, err: dict[str, Any], lines: dict[tuple[Any, ...], int]) -> str:
    # drop union-branch markers (e.g. 'LengthDistribution', 'int') from the location
    loc = tuple(p for p in err["loc"] if isinstance(p, int) or not p[:1].isupper() and p != "int")
    line = 1
    for n in range(len(loc), -1, -1):
        if loc[:n] in lines:
            line = lines[loc[:n]]
            break
    field = ".".join(str(p) for p in loc) or "(top level)"
    msg = err["msg"].removeprefix("Value error, ")
    got = ""
    if err["type"] not in ("missing", "value_error") and not isinstance(err.get("input"), dict):
        got = f" (got {err.get('input')!r})"
    hint = _HINTS.get(err["type"])
    return f"{source}:{line}: {field}: {msg}{got}" + (f"; {hint}" if hint else "")


def parse_spec(text: str, source: str = "<spec>", base_dir: str = ".") -> Spec:
    """Returns the validated spec in `text`, or raises SpecError with file:line messages."""
    try:
        data, lines = load_with_lines(text, source)
    except YamlSyntaxError as exc:
        raise SpecError([str(exc)]) from None
    if not isinstance(data, dict):
        raise SpecError([f"{source}:1: the spec must be a mapping with model, devices, workload"])
    raw_profiles = data.get("profiles")
    profiles: dict[str, Profile] = {}
    if isinstance(raw_profiles, list) and all(isinstance(x, str) for x in raw_profiles):
        profiles = _load_profiles(raw_profiles, base_dir, source, lines)
    kinds = {k: p.kind for k, p in profiles.items()}
    # one model: `model` and `workload` are required (said as pydantic says a missing field)
    missing = [] if "models" in data else [k for k in ("model", "workload") if k not in data]
    missing_lines = [
        _format_error(source, {"loc": (k,), "msg": "Field required", "type": "missing"}, lines)
        for k in missing
    ]
    try:
        spec = Spec.model_validate({**data, "base_dir": base_dir}, context={"profile_kinds": kinds})
    except ValidationError as exc:
        found = [
            _format_error(source, e, lines)
            for e in exc.errors()
            if not (missing and e["loc"] == ())  # the same complaint, said per field above
        ]
        raise SpecError(found + missing_lines) from None
    if missing_lines:
        raise SpecError(missing_lines)
    _check_topology(spec, source, lines)
    _check_context(spec, source, lines)
    names = [n for n, _, _ in spec.device_names()]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise SpecError(
            [
                f"{source}:{lines.get(('devices',), 1)}: devices: names repeat: "
                f"{', '.join(dupes)}; give each device its own name"
            ]
        )
    return spec


def _check_context(spec: Spec, source: str, lines: dict[tuple[Any, ...], int]) -> None:
    """Raises SpecError when a workload's mean prompt plus mean output is more than its model's
    context: the server refuses such requests, so no plan serves that workload."""
    entries: list[tuple[tuple[Any, ...], str, Workload]] = []
    if spec.models is None:
        if spec.model is not None and spec.workload is not None:
            entries.append((("workload",), spec.model, spec.workload))
    else:
        entries.extend((("models", i, "workload"), e.model, e.workload)
                       for i, e in enumerate(spec.models))
    errors = []
    for loc, model, workload in entries:
        if workload.trace is not None or workload.prompt_tokens is None or workload.output_tokens is None:
            continue  # a trace's requests beyond the context are left out where it is read
        prompt, output = _as_dist(workload.prompt_tokens).mean, _as_dist(workload.output_tokens).mean
        context = get_model_arch(model).max_context
        if prompt + output > context:
            where = ".".join(str(p) for p in loc)
            errors.append(
                f"{source}:{lines.get(loc, 1)}: {where}: prompt_tokens {prompt:g} + output_tokens "
                f"{output:g} is more than {model}'s context of {context} tokens, so the server "
                "would refuse such requests; give lengths that fit it"
            )
    if errors:
        raise SpecError(errors)


def _check_topology(spec: Spec, source: str, lines: dict[tuple[Any, ...], int]) -> None:
    """Raises SpecError when devices, nodes and links do not name each other consistently."""
    errors: list[str] = []
    if spec.nodes is None:
        if spec.links:
            errors.append(
                f"{source}:{lines.get(('links',), 1)}: links: needs a `nodes` section; "
                "describe each node's NIC under `nodes` first"
            )
        if errors:
            raise SpecError(errors)
        return
    node_names = [n.name for n in spec.nodes]
    for i, n in enumerate(spec.nodes):
        if node_names.index(n.name) != i:
            errors.append(
                f"{source}:{lines.get(('nodes', i), 1)}: nodes.{i}.name: node {n.name!r} "
                "is listed twice; list each node once"
            )
    regions = {n.region for n in spec.nodes if n.region is not None}
    clash = sorted(regions & set(node_names))
    if clash:
        errors.append(
            f"{source}:{lines.get(('nodes',), 1)}: nodes: {', '.join(clash)} name both a node "
            "and a region; rename one"
        )
    for i, g in enumerate(spec.devices):
        if g.node not in node_names:
            errors.append(
                f"{source}:{lines.get(('devices', i, 'node'), lines.get(('devices', i), 1))}: "
                f"devices.{i}.node: node {g.node!r} is not in `nodes` "
                f"({', '.join(node_names)}); add it there or fix the name"
            )
    seen: dict[frozenset[str], int] = {}
    for i, link in enumerate(spec.links):
        line = lines.get(("links", i), 1)
        for end in link.between:
            if end not in node_names and end not in regions:
                errors.append(
                    f"{source}:{line}: links.{i}.between: {end!r} is neither a node nor a "
                    f"region of `nodes`; use one of {', '.join(node_names + sorted(regions))}"
                )
        a, b = link.between
        if a == b and a in node_names:
            errors.append(
                f"{source}:{line}: links.{i}.between: a link joins two different nodes; "
                f"set nodes.intra_gbps for links inside {a!r}"
            )
        key = frozenset(link.between)
        if key in seen:
            errors.append(
                f"{source}:{line}: links.{i}: {a} - {b} is already given by links.{seen[key]}; "
                "keep one"
            )
        seen.setdefault(key, i)
    if errors:
        raise SpecError(errors)


def _load_profiles(
    paths: list[str], base_dir: str, source: str, lines: dict[tuple[Any, ...], int]
) -> dict[str, Profile]:
    """Returns the profiles `paths` name, keyed by lower-cased kind, or raises SpecError."""
    errors: list[str] = []
    out: dict[str, Profile] = {}
    for i, rel in enumerate(paths):
        where = f"{source}:{lines.get(('profiles', i), lines.get(('profiles',), 1))}: profiles.{i}"
        try:
            profile = load_profile(Path(base_dir) / rel)
        except ProfileError as exc:
            errors.append(
                f"{where}: cannot use profile {rel!r}; fix it or re-run "
                "`pipeshift calibrate --out PROFILE.yaml`:"
            )
            errors.extend(f"  {line}" for line in exc.lines)
            continue
        key = profile.kind.lower()
        if key in out:
            errors.append(
                f"{where}: {rel!r} profiles kind {profile.kind!r} again (also {out[key].path}); "
                "keep one profile per kind"
            )
        out[key] = profile
    if errors:
        raise SpecError(errors)
    return out


def spec_profiles(spec: Spec) -> dict[str, Profile]:
    """Returns the spec's profiles keyed by lower-cased kind (raises SpecError)."""
    return _load_profiles(spec.profiles, spec.base_dir, "spec", {})


def load_spec(path: str | Path) -> Spec:
    """Returns the validated spec in the YAML file `path` (see parse_spec)."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise SpecError([f"{p}: cannot read the spec: {exc.strerror}{_example_hint(p, exc)}"]) from None
    except UnicodeDecodeError:
        raise SpecError([f"{p}: not a text (UTF-8) file; give the spec as YAML"]) from None
    return parse_spec(text, source=str(p), base_dir=str(p.parent))


def _example_hint(path: Path, exc: OSError) -> str:
    """Returns how to copy the example a missing spec is named after (the README's
    data/specs/NAME.yaml, read where no checkout is), else nothing."""
    from cost_models.paths import specs_dir

    if not isinstance(exc, FileNotFoundError) or not (specs_dir() / f"{path.stem}.yaml").is_file():
        return ""
    return f"; {path.stem} is an example pipeshift ships: `pipeshift examples {path.stem} --to .` copies it here"
