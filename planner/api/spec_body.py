"""A spec as the REST API takes it: the YAML file's fields that make sense over the network,
with every constraint the planner enforces written into the schema (catalog names as enums,
bounds on numbers), so a body the OpenAPI document allows is a spec the planner can read.

Left out: `workload.trace`, `calibration` and `profiles` (files of the planner's host), device
`names` and `pins` (the deployment's workers name the devices), `current` (the deployment says
what serves). What JSON Schema cannot say (every device's node listed in `nodes`, links between
known nodes or regions) is a 409 naming the problem.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

from cost_models.device_catalog import load_device_catalog
from cost_models.model_catalog import load_model_catalog
from planner.spec import Spec

MAX_TOKENS = 10_000_000
TokenCount = Annotated[int, Field(ge=1, le=MAX_TOKENS)]


def _names(catalog: dict) -> tuple[str, ...]:
    return tuple(
        sorted(
            {entry.name for entry in catalog.values()}
            | {a for e in catalog.values() for a in e.aliases}
        )
    )


ModelName = Literal[_names(load_model_catalog())]  # type: ignore[valid-type]
DeviceKindName = Literal[_names(load_device_catalog())]  # type: ignore[valid-type]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Lengths(_Body):
    mean: float = Field(gt=0, le=MAX_TOKENS)
    p50: float | None = Field(None, gt=0, le=MAX_TOKENS)
    p90: float | None = Field(None, gt=0, le=MAX_TOKENS)
    p95: float | None = Field(None, gt=0, le=MAX_TOKENS)
    p99: float | None = Field(None, gt=0, le=MAX_TOKENS)
    max: float | None = Field(None, gt=0, le=MAX_TOKENS)


class DeviceGroupBody(_Body):
    kind: DeviceKindName
    count: int = Field(1, ge=1, le=4096)
    node: str = Field("local", min_length=1, max_length=100)


class NodeBody(_Body):
    """A node of the topology (the YAML `nodes` entry): its NIC, region, internal link, and
    for CPU workers the host's cores and memory bus they share."""

    name: str = Field(min_length=1, max_length=100)
    nic_gbps: float = Field(gt=0, le=1e6)
    nic_latency_us: float = Field(10.0, ge=0, le=1e9)
    region: str | None = Field(None, min_length=1, max_length=100)
    intra_gbps: float | None = Field(None, gt=0, le=1e6)
    intra_latency_us: float | None = Field(None, ge=0, le=1e9)
    cpu_cores: int | None = Field(None, ge=1, le=4096)
    threads_per_worker: int = Field(1, ge=1, le=4096)
    memory_gb_s: float | None = Field(None, gt=0, le=1e6)


class LinkBody(_Body):
    """The path between two nodes or regions (the YAML `links` entry)."""

    between: list[Annotated[str, Field(min_length=1, max_length=100)]] = Field(min_length=2, max_length=2)
    gbps: float = Field(gt=0, le=1e6)
    latency_us: float = Field(ge=0, le=1e9)


class WorkloadBody(_Body):
    request_rate_per_s: float = Field(1.0, gt=0, le=1e6)
    prompt_tokens: Lengths | TokenCount
    output_tokens: Lengths | TokenCount
    batch: int = Field(8, ge=1, le=4096)


class SloBody(_Body):
    ttft_ms: float | None = Field(None, gt=0, le=1e9)
    # out of 100, as the YAML's (planner/spec.py Slo): 0.99 would be a fraction meant as p99
    ttft_percentile: float = Field(99, ge=1, le=100)
    tpot_ms: float | None = Field(None, gt=0, le=1e9)
    tpot_percentile: float = Field(99, ge=1, le=100)


class SpecBody(_Body):
    model: ModelName
    dtype: Literal["fp32", "bf16", "fp16", "int8", "q4"] = "bf16"
    devices: list[DeviceGroupBody] = Field(min_length=1, max_length=64)
    workload: WorkloadBody
    slo: SloBody = Field(default_factory=SloBody)
    objective: Literal["max_throughput", "min_devices"] = "max_throughput"
    memory_utilization: float = Field(0.9, gt=0, le=1)
    max_stages: int = Field(16, ge=1, le=256)
    controller: Literal["auto", "propose", "off"] = "off"
    nodes: list[NodeBody] | None = Field(None, min_length=1, max_length=256)
    links: list[LinkBody] | None = Field(None, max_length=4096)

    def to_spec(self) -> Spec:
        return _validated(self.model_dump(mode="json", exclude_none=True))


def _validated(data: dict) -> Spec:
    """Returns the Spec; raises OperationError 409 naming what does not hold together (a
    device on a node `nodes` does not list, a link to an unknown node), which the schema
    cannot say."""
    from planner.operations import OperationError
    from planner.spec import SpecError, _check_topology

    try:
        spec = Spec.model_validate(data)
        _check_topology(spec, "spec", {})
    except (ValueError, SpecError) as exc:
        problems = str(exc).replace("spec:1: ", "")  # a body has no lines to point at
        raise OperationError(f"the spec does not hold together: {problems}", 409) from None
    return spec


class ModelBody(_Body):
    """One of several models sharing the pool (the YAML `models` entry)."""

    name: str | None = Field(None, min_length=1, max_length=100)
    model: ModelName
    workload: WorkloadBody
    slo: SloBody = Field(default_factory=SloBody)
    weight: float = Field(1.0, gt=0, le=1e6)


class PoolSpecBody(_Body):
    """A spec with several models on one pool; a deployment serves one model, so planning it
    against one is refused (409) - `pipeshift plan -f SPEC` plans it."""

    models: list[ModelBody] = Field(min_length=1, max_length=16)
    dtype: Literal["fp32", "bf16", "fp16", "int8", "q4"] = "bf16"
    devices: list[DeviceGroupBody] = Field(min_length=1, max_length=64)
    objective: Literal["max_throughput", "min_devices"] = "max_throughput"
    memory_utilization: float = Field(0.9, gt=0, le=1)
    max_stages: int = Field(16, ge=1, le=256)

    def to_spec(self) -> Spec:
        data = self.model_dump(mode="json", exclude_none=True)
        seen: dict[str, int] = {}
        for entry in data["models"]:  # entries without their own name get one that is unique
            label = entry.get("name") or entry["model"]
            seen[label] = seen.get(label, 0) + 1
            entry["name"] = label if seen[label] == 1 else f"{label}#{seen[label]}"
        return _validated(data)


def _form(body: object) -> str:
    """Which form a spec body is: with `models`, several models on one pool; else one model.
    Choosing before validating keeps a mistake in one form from being reported as the other
    form's missing and extra fields as well."""
    return "PoolSpecBody" if isinstance(body, dict) and "models" in body else "SpecBody"


AnySpecBody = Annotated[
    Annotated[SpecBody, Tag("SpecBody")] | Annotated[PoolSpecBody, Tag("PoolSpecBody")],
    Discriminator(_form),
]
