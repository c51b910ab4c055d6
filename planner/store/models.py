"""The store's tables, as SQLAlchemy 2.0 typed ORM classes. Alembic's migrations
(`migrations/versions/`) must produce exactly these; `alembic check` says when they do not."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from sqlalchemy import JSON, BigInteger, DateTime, ForeignKey, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# What made a configuration, and what started an apply: `observed` a refresh found it serving;
# the others name the command or the part of pipeshift that applied it.
Source = Literal["observed", "apply", "rollback", "drain", "controller"]


def utc_now() -> datetime:
    return datetime.now(UTC)


def as_utc(moment: datetime) -> datetime:
    """Returns `moment` as an aware UTC time (SQLite hands back the store's UTC times without
    their zone)."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


class Base(DeclarativeBase):
    type_annotation_map = {
        dict[str, Any]: JSON,
        list[Any]: JSON,
        datetime: DateTime(timezone=True),
    }


class DeviceRow(Base):
    """A device the deployment has seen, and what it does now."""

    __tablename__ = "devices"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    kind: Mapped[str] = mapped_column(String(100))
    node: Mapped[str] = mapped_column(String(200))
    state: Mapped[str] = mapped_column(String(20))  # serving | spare | drained | gone
    first_seen: Mapped[datetime] = mapped_column(default=utc_now)
    last_seen: Mapped[datetime] = mapped_column(default=utc_now)


class DeviceEventRow(Base):
    """A device joining the deployment, changing state (serving, spare, drained) or leaving it
    (`gone`), as the store saw it: at a refresh from the server, which every command that
    changes the fleet (`pipeshift device add|drain`, apply, the REST API) runs when it is done."""

    __tablename__ = "device_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    device: Mapped[str] = mapped_column(String(200), index=True)
    kind: Mapped[str] = mapped_column(String(100))
    node: Mapped[str] = mapped_column(String(200))
    state_from: Mapped[str | None] = mapped_column(String(20))  # None: first seen
    state_to: Mapped[str] = mapped_column(String(20))
    at: Mapped[datetime] = mapped_column(default=utc_now)


class ConfigurationRow(Base):
    """One configuration a deployment served or was told to serve. Configurations of one
    deployment share a lineage and count up by serial; a plan names the pair it was made
    against, so a plan made against an older serial is stale. A store is the history of one
    deployment: each configuration names the server it was seen at, and a refresh from another
    server that is not that deployment moved is refused (planner/deployment_state.py)."""

    __tablename__ = "configurations"
    __table_args__ = (UniqueConstraint("lineage", "serial", name="uq_configurations_lineage_serial"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    lineage: Mapped[str] = mapped_column(String(36), index=True)
    serial: Mapped[int]
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("configurations.id"))
    model: Mapped[str] = mapped_column(String(200))
    pipelines: Mapped[list[Any]]  # [{"stages": [{"device", "start", "end"}]}]
    epoch: Mapped[int | None]  # the serving process's epoch, when it served it
    predicted: Mapped[dict[str, Any] | None]  # the planner's figures for it
    spec: Mapped[dict[str, Any] | None]  # the spec it was planned from
    source: Mapped[str] = mapped_column(String(20))  # a Source
    # The admin URL of the deployment it was observed or applied at (None: recorded before 0005,
    # or by the serving process itself, until a command adopts the address it reaches it at).
    server: Mapped[str | None] = mapped_column(String(500))
    note: Mapped[str | None] = mapped_column(Text)  # why it was recorded, when not plain (the deployment moved)
    created_at: Mapped[datetime] = mapped_column(default=utc_now)


class PlanRow(Base):
    """A saved plan: what it changes, and the configuration it was made against."""

    __tablename__ = "plans"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    against_id: Mapped[int] = mapped_column(ForeignKey("configurations.id"))
    lineage: Mapped[str] = mapped_column(String(36))
    serial: Mapped[int]
    target: Mapped[list[Any]]  # pipelines, as in ConfigurationRow
    spec: Mapped[dict[str, Any] | None]
    diff: Mapped[dict[str, Any]]  # the reconfiguration plan as JSON
    prediction: Mapped[dict[str, Any]]
    text: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utc_now)


class ApplyRow(Base):
    """One apply, written as it progresses: a process killed mid-apply leaves a row in state
    `running` that the next reader marks `interrupted`, and that a refresh from the server fills
    in once the server has finished that apply."""

    __tablename__ = "applies"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    plan_id: Mapped[str | None] = mapped_column(ForeignKey("plans.id"))
    from_id: Mapped[int | None] = mapped_column(ForeignKey("configurations.id"))
    to_id: Mapped[int | None] = mapped_column(ForeignKey("configurations.id"))
    server_apply_id: Mapped[str | None] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(20))  # running | done | interrupted | detached
    outcome: Mapped[str | None] = mapped_column(String(20))  # applied | aborted | rolled_back | failed
    error: Mapped[str | None] = mapped_column(Text)
    note: Mapped[str | None] = mapped_column(Text)  # how the row was completed, when not by its process
    source: Mapped[str | None] = mapped_column(String(20))  # a Source but observed (None: before 0004)
    holder: Mapped[str] = mapped_column(String(200))  # host:pid of the process applying
    phases: Mapped[list[Any]]
    bytes_moved: Mapped[int] = mapped_column(BigInteger, default=0)
    stall_ms: Mapped[float | None]
    serving: Mapped[dict[str, Any] | None]  # TTFT/TPOT before, during and after
    started_at: Mapped[datetime] = mapped_column(default=utc_now)
    finished_at: Mapped[datetime | None]


class DecisionRow(Base):
    """One decision of the live controller (agent/controller_runner.py), acting or not: what
    it saw, what it would serve, why it did or did not change, and the figures it predicted."""

    __tablename__ = "decisions"

    id: Mapped[int] = mapped_column(primary_key=True)
    serial: Mapped[int]  # the controller's own count, as GET /admin/v1/controller shows it
    holder: Mapped[str] = mapped_column(String(200))  # host:pid of the serving process
    mode: Mapped[str] = mapped_column(String(20))  # auto | propose
    act: Mapped[bool]
    reason: Mapped[str] = mapped_column(Text)
    current: Mapped[dict[str, Any]]  # configuration: {"pipelines": [...]}
    target: Mapped[dict[str, Any]]
    predicted: Mapped[dict[str, Any]]  # goodput, value, gain, cost, payback, stall, prefetch
    workload: Mapped[dict[str, Any]]  # the window it decided on
    plan_id: Mapped[str | None] = mapped_column(ForeignKey("plans.id"))  # a proposal's or a started apply's plan
    server_apply_id: Mapped[str | None] = mapped_column(String(64))  # auto: the apply it started
    error: Mapped[str | None] = mapped_column(Text)  # the apply path refused
    decided_at: Mapped[datetime] = mapped_column(default=utc_now)


class LockRow(Base):
    """Who may change a deployment now. One row per locked deployment."""

    __tablename__ = "locks"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)  # what is locked
    holder: Mapped[str] = mapped_column(String(200))
    reason: Mapped[str] = mapped_column(String(200))
    since: Mapped[datetime] = mapped_column(default=utc_now)
