"""The planner REST API's bodies: what it takes and what it answers (pydantic)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from planner.api.spec_body import AnySpecBody
from planner.store.models import ApplyRow, ConfigurationRow, PlanRow, Source, as_utc

UtcTime = Annotated[datetime, AfterValidator(as_utc)]


class Problem(BaseModel):
    """Every refusal: what was wrong and what to do (a bad body: FastAPI's list of fields)."""

    detail: str | list[dict[str, Any]]


class Stage(BaseModel):
    device: str
    start: int
    end: int


class Pipeline(BaseModel):
    stages: list[Stage]


# ---- requests -------------------------------------------------------------------------------


class PlanRequest(BaseModel):
    """`POST /v1/plans`: the spec as JSON (planner/api/spec_body.py says which fields)."""

    model_config = ConfigDict(extra="forbid")
    spec: AnySpecBody
    time_limit_s: float = Field(10.0, gt=0, le=60, description="solver time limit")


class ApplyRequest(BaseModel):
    """`POST /v1/applies`: apply exactly a saved plan."""

    model_config = ConfigDict(extra="forbid")
    plan_id: str = Field(min_length=1, max_length=64)
    max_overhead: float | None = Field(
        None, gt=0, le=1, description="share of serving time the background copies may take"
    )


class RollbackRequest(BaseModel):
    """`POST /v1/rollback`: plan and apply a return to a recorded configuration."""

    model_config = ConfigDict(extra="forbid")
    configuration_id: int = Field(ge=1, le=2**31 - 1)  # the store keeps int32 ids
    max_overhead: float | None = Field(None, gt=0, le=1)


# ---- answers --------------------------------------------------------------------------------


class ConfigurationOut(BaseModel):
    id: int
    lineage: str
    serial: int
    parent_id: int | None
    model: str
    pipelines: list[Pipeline]
    epoch: int | None
    source: Source
    predicted: dict[str, Any] | None
    server: str | None = Field(
        default=None, description="the admin URL of the deployment it was observed or applied at "
        "(None: recorded before 0005)")
    note: str | None = Field(default=None, description="why it was recorded, when not plain (the deployment moved)")
    created_at: UtcTime

    @classmethod
    def of(cls, row: ConfigurationRow) -> ConfigurationOut:
        return cls(
            id=row.id,
            lineage=row.lineage,
            serial=row.serial,
            parent_id=row.parent_id,
            model=row.model,
            pipelines=row.pipelines,
            epoch=row.epoch,
            source=row.source,
            predicted=row.predicted,
            server=row.server,
            note=row.note,
            created_at=row.created_at,
        )


class PlanOut(BaseModel):
    id: str
    against_configuration_id: int
    lineage: str
    serial: int
    has_changes: bool
    target: list[Pipeline]
    diff: dict[str, Any]
    prediction: dict[str, Any]
    text: str = Field(description="the plan as `pipeshift plan` prints it")
    drift: str | None = None
    moved: str | None = Field(default=None, description="the deployment answered at another address than "
                              "the store recorded, which no longer answers: recorded as moved")
    created_at: UtcTime

    @classmethod
    def of(cls, row: PlanRow, drift: str | None = None, moved: str | None = None) -> PlanOut:
        return cls(
            id=row.id,
            against_configuration_id=row.against_id,
            lineage=row.lineage,
            serial=row.serial,
            has_changes=bool(row.diff.get("has_changes", True)),
            target=row.target,
            diff=row.diff,
            prediction=row.prediction,
            text=row.text,
            drift=drift,
            moved=moved,
            created_at=row.created_at,
        )


class ApplyOut(BaseModel):
    id: str
    state: Literal["running", "done", "interrupted", "detached"]
    outcome: Literal["applied", "aborted", "rolled_back", "failed"] | None
    error: str | None
    note: str | None = Field(
        default=None,
        description="how the row was completed when not by its own process (filled from the server)",
    )
    source: Source | None = Field(
        default=None, description="what started it: apply, rollback, drain or controller (None: recorded before 0004)"
    )
    plan_id: str | None
    from_configuration_id: int | None
    to_configuration_id: int | None
    server_apply_id: str | None
    phases: list[dict[str, Any]]
    bytes_moved: int
    stall_ms: float | None
    serving: dict[str, Any] | None = Field(
        description="TTFT/TPOT before, during and after, and token times"
    )
    started_at: UtcTime
    finished_at: UtcTime | None

    @classmethod
    def of(cls, row: ApplyRow) -> ApplyOut:
        return cls(
            id=row.id,
            state=row.state,
            outcome=row.outcome,
            error=row.error,
            note=row.note,
            source=row.source,
            plan_id=row.plan_id,
            from_configuration_id=row.from_id,
            to_configuration_id=row.to_id,
            server_apply_id=row.server_apply_id,
            phases=row.phases,
            bytes_moved=row.bytes_moved,
            stall_ms=row.stall_ms,
            serving=row.serving,
            started_at=row.started_at,
            finished_at=row.finished_at,
        )


class ApplyStarted(BaseModel):
    """The answer to an apply or a rollback: the apply (None when nothing had to change)."""

    apply: ApplyOut | None
    has_changes: bool
    text: str = Field(description="the change as `pipeshift apply` prints it")
    drift: str | None = None
    moved: str | None = Field(default=None, description="the deployment answered at another address than "
                              "the store recorded, which no longer answers: recorded as moved")


class ConfigurationList(BaseModel):
    data: list[ConfigurationOut]


class HistoryEvent(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["configuration", "apply", "device", "decision"]
    id: int | str
    at: str
    server: str | None = Field(default=None, description="a configuration's: the admin URL of the deployment "
                               "it was observed or applied at (None: recorded before 0005)")


class History(BaseModel):
    data: list[HistoryEvent]


class Device(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    kind: str
    state: str


class Cluster(BaseModel):
    """What the planner sees: the deployment's devices and epoch (when it answers) and the
    store's current configuration."""

    server: str
    reachable: bool
    error: str | None = None
    model: str | None = None
    epoch: int | None = None
    devices: list[Device]
    serving: list[Pipeline] | None = Field(None, description="what the deployment serves now")
    configuration: ConfigurationOut | None = Field(None, description="the store's newest record")
    drift: bool = Field(False, description="the deployment serves something other than the record")
