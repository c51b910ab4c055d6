"""Reading and writing the store: one transaction per user action.

Configurations of one deployment form a lineage counted by serial; a saved plan remembers the
(lineage, serial) it was made against and is refused once another serial serves. An apply's
row is written when it begins and as it progresses, so a killed process leaves a `running` row
that the next reader marks `interrupted`, and that a refresh from the server fills in once the
server has finished that apply (`fill_interrupted`). A lock row says who may change a deployment
now.
Every decision of a serving process's controller is a row too, acting or not, and so is every
change of the fleet a refresh sees (a device joining, drained, given back, gone).
A store is one deployment's history: each configuration names the server it was seen at
(`refresh` refuses another deployment's, planner/deployment_state.py).
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from planner.store.models import (
    ApplyRow,
    ConfigurationRow,
    DecisionRow,
    DeviceEventRow,
    DeviceRow,
    LockRow,
    PlanRow,
    as_utc,
    utc_now,
)

UNFOLLOWED = ("interrupted", "detached")  # apply rows a refresh completes from the server's record


class UnknownId(LookupError):
    """No row has this id."""


class StalePlan(RuntimeError):
    """A saved plan was made against a configuration that no longer serves."""


class LockHeld(RuntimeError):
    """Someone else is changing this deployment."""

    def __init__(self, lock: LockRow):
        self.lock_id, self.holder, self.since, self.reason = lock.id, lock.holder, lock.since, lock.reason
        held = f"the deployment is locked: held by {lock.holder} since {_when(lock.since)} ({lock.reason})"
        if process_alive(lock.holder) is False:  # on this host, and dead: say so, and what frees it
            pid = lock.holder.rpartition(":")[2]
            super().__init__(
                f"{held}; that process (pid {pid}) is no longer running on this host, so nothing will "
                f"release its lock: run `pipeshift force-unlock {lock.id}`, then try again"
            )
        else:
            super().__init__(f"{held}; if that process is gone, run `pipeshift force-unlock {lock.id}`")


def this_process() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def process_alive(holder: str) -> bool | None:
    """Returns whether the process `host:pid` runs; None when it is on another host."""
    host, _, pid = holder.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _newest(s: Session, lineage: str | None) -> ConfigurationRow | None:
    """Returns the newest configuration (of `lineage`, when given)."""
    query = select(ConfigurationRow).order_by(ConfigurationRow.id.desc()).limit(1)
    if lineage is not None:
        query = query.where(ConfigurationRow.lineage == lineage)
    return s.scalars(query).first()


def _get(s: Session, row_type: type, key: Any, missing: str) -> Any:
    """Returns the row of `row_type` with primary key `key`; raises UnknownId(missing)."""
    row = s.get(row_type, key)
    if row is None:
        raise UnknownId(missing)
    return row


def _add_configuration(s: Session, model: str, pipelines: list[Any], source: str, epoch: int | None = None,
                       predicted: dict[str, Any] | None = None, spec: dict[str, Any] | None = None,
                       lineage: str | None = None, created_at: datetime | None = None,
                       server: str | None = None, note: str | None = None) -> ConfigurationRow:
    """Adds a configuration after the newest of its lineage, in the transaction `s`; at the
    parent's server unless `server` is given (the deployment does not move by being changed)."""
    parent = _newest(s, lineage)
    row = ConfigurationRow(
        lineage=lineage or (parent.lineage if parent else str(uuid.uuid4())),
        serial=(parent.serial + 1) if parent else 1,
        parent_id=parent.id if parent else None,
        model=model, pipelines=pipelines, epoch=epoch, predicted=predicted, spec=spec, source=source,
        server=server or (parent.server if parent else None), note=note,
    )
    if created_at is not None:
        row.created_at = created_at
    s.add(row)
    s.flush()
    return row


def stage_layout(pipelines: list[Any]) -> list[list[tuple[str, int, int]]]:
    """Returns the (device, start, end) of every stage, pipeline by pipeline: what serves, to
    compare configurations by."""
    return [[(st["device"], int(st["start"]), int(st["end"])) for st in p["stages"]] for p in pipelines]


def _server_time(unix_s: Any, earliest: datetime) -> datetime:
    """Returns the server's unix time `unix_s` as a UTC time, no earlier than `earliest` and no later
    than now (the two hosts' clocks may disagree); now when the server gave none."""
    now = utc_now()
    if not isinstance(unix_s, int | float):
        return now
    return min(max(datetime.fromtimestamp(unix_s, UTC), as_utc(earliest)), now)


def _when(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC") if moment.tzinfo is None else moment.strftime("%Y-%m-%d %H:%M:%S %Z")


class Store:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """One user action: commits at the end, rolls back on an exception."""
        with self._sessions.begin() as session:
            yield session

    # ---- devices ----------------------------------------------------------------------------
    def record_devices(self, devices: list[dict[str, Any]]) -> None:
        """Upserts the devices a server reports ({"name", "kind", "node", "state"}); devices
        it no longer reports become `gone`. Each device seen first, or in another state than
        recorded, also gets a device event (one `at` for all of one refresh)."""
        with self.transaction() as s:
            known = {d.name: d for d in s.scalars(select(DeviceRow))}
            now = utc_now()

            def changed(row: DeviceRow, before: str | None) -> None:
                if row.state != before:
                    s.add(DeviceEventRow(device=row.name, kind=row.kind, node=row.node, state_from=before,
                                         state_to=row.state, at=now))

            for d in devices:
                row = known.pop(d["name"], None)
                before = row.state if row is not None else None
                if row is None:
                    row = DeviceRow(name=d["name"], first_seen=now)
                    s.add(row)
                row.kind, row.node, row.state = d.get("kind", "cpu"), d.get("node", "local"), d.get("state", "serving")
                row.last_seen = now
                changed(row, before)
            for row in known.values():
                before, row.state = row.state, "gone"
                changed(row, before)

    def device_events(self) -> list[DeviceEventRow]:
        """Returns every device event, oldest first."""
        with self.transaction() as s:
            return list(s.scalars(select(DeviceEventRow).order_by(DeviceEventRow.id)))

    def devices(self) -> list[DeviceRow]:
        with self.transaction() as s:
            return list(s.scalars(select(DeviceRow).order_by(DeviceRow.id)))

    # ---- configurations ---------------------------------------------------------------------
    def current(self, lineage: str | None = None) -> ConfigurationRow | None:
        """Returns the newest configuration (of `lineage`, when given)."""
        with self.transaction() as s:
            return _newest(s, lineage)

    def record_configuration(self, model: str, pipelines: list[Any], source: str, epoch: int | None = None,
                             predicted: dict[str, Any] | None = None, spec: dict[str, Any] | None = None,
                             lineage: str | None = None, server: str | None = None,
                             note: str | None = None) -> ConfigurationRow:
        """Adds a configuration after the newest of its lineage (a new lineage when none is
        given and the store has none), at `server` (default: its parent's)."""
        with self.transaction() as s:
            return _add_configuration(s, model, pipelines, source, epoch, predicted, spec, lineage,
                                      server=server, note=note)

    def adopt_server(self, configuration_id: int, server: str) -> ConfigurationRow:
        """Gives a configuration recorded without a server (before migration 0005, or by the
        serving process itself) the server a refresh found it serving at."""
        with self.transaction() as s:
            row = _get(s, ConfigurationRow, configuration_id, f"no configuration {configuration_id}")
            if row.server is None:
                row.server = server
            return row

    def configuration(self, configuration_id: int) -> ConfigurationRow:
        with self.transaction() as s:
            return _get(s, ConfigurationRow, configuration_id,
                        f"no configuration {configuration_id}: `pipeshift history` lists them")

    def configurations(self) -> list[ConfigurationRow]:
        with self.transaction() as s:
            return list(s.scalars(select(ConfigurationRow).order_by(ConfigurationRow.id)))

    # ---- plans ------------------------------------------------------------------------------
    def save_plan(self, against: ConfigurationRow, target: list[Any], diff: dict[str, Any],
                  prediction: dict[str, Any], text: str, spec: dict[str, Any] | None = None) -> PlanRow:
        with self.transaction() as s:
            row = PlanRow(id=str(uuid.uuid4()), against_id=against.id, lineage=against.lineage,
                          serial=against.serial, target=target, spec=spec, diff=diff,
                          prediction=prediction, text=text)
            s.add(row)
            return row

    def plan(self, plan_id: str) -> PlanRow:
        with self.transaction() as s:
            return _get(s, PlanRow, plan_id, f"no plan {plan_id} in the store: `pipeshift history --decisions` names "
                        "the controller's proposals, `pipeshift plan -out FILE` saves one")

    def check_fresh(self, plan: PlanRow) -> None:
        """Raises StalePlan unless the configuration the plan was made against still serves."""
        now = self.current(plan.lineage)
        if now is None or now.serial != plan.serial:
            raise StalePlan(
                f"Saved plan is stale: it was made against serial {plan.serial} of lineage {plan.lineage}, "
                f"and serial {now.serial if now else '?'} is the current one. Run `pipeshift plan` again."
            )

    # ---- applies ----------------------------------------------------------------------------
    def begin_apply(self, plan_id: str | None, from_id: int | None, source: str = "apply") -> ApplyRow:
        """`source`: what started it (apply, rollback, drain, controller), as the configuration
        it produces will say."""
        with self.transaction() as s:
            row = ApplyRow(id=f"a-{uuid.uuid4().hex[:12]}", plan_id=plan_id, from_id=from_id, state="running",
                           holder=this_process(), phases=[], bytes_moved=0, source=source)
            s.add(row)
            return row

    def update_apply(self, apply_id: str, **fields: Any) -> ApplyRow:
        """Writes an apply's progress (phases, server_apply_id, bytes_moved, ...)."""
        with self.transaction() as s:
            row = _get(s, ApplyRow, apply_id, f"no apply {apply_id}")
            for name, value in fields.items():
                setattr(row, name, value)
            return row

    def finish_apply(self, apply_id: str, outcome: str, error: str | None = None, **fields: Any) -> ApplyRow:
        return self.update_apply(apply_id, state="done", outcome=outcome, error=error, finished_at=utc_now(), **fields)

    def reap_interrupted(self) -> list[str]:
        """Marks `interrupted` every running apply whose process on this host is gone."""
        reaped = []
        with self.transaction() as s:
            for row in s.scalars(select(ApplyRow).where(ApplyRow.state == "running")):
                if process_alive(row.holder) is False:
                    row.state, row.finished_at = "interrupted", utc_now()
                    row.error = (f"the process applying it ({row.holder}) ended before the apply did; "
                                 "check the deployment with `pipeshift plan`")
                    reaped.append(row.id)
        return reaped

    def detach_apply(self, apply_id: str, note: str) -> ApplyRow:
        """Leaves the started apply `apply_id` to the server: its process does not follow it
        (`pipeshift device drain --no-wait`), and the next refresh fills it in from the server's
        record, as it does an interrupted one."""
        return self.update_apply(apply_id, state="detached", note=note)

    def interrupted(self) -> list[ApplyRow]:
        """Returns the interrupted and detached applies that had started on the server (they
        name its apply), oldest first, after marking those whose process is gone."""
        self.reap_interrupted()
        with self.transaction() as s:
            query = (select(ApplyRow).where(ApplyRow.state.in_(UNFOLLOWED), ApplyRow.server_apply_id.is_not(None))
                     .order_by(ApplyRow.started_at, ApplyRow.id))
            return list(s.scalars(query))

    def fill_interrupted(self, apply_id: str, record: dict[str, Any], model: str,
                         serving: dict[str, Any] | None = None) -> tuple[ApplyRow, ConfigurationRow | None] | None:
        """Completes the interrupted apply `apply_id` from the server's finished record of it (the
        admin API's `GET /admin/v1/applies/{id}`) as its own process would have: outcome, phases,
        bytes, hold at the switch, serving figures, and, when it was applied, the configuration
        it produced (the one already recorded for its epoch, if a refresh recorded it). Returns
        the row and that configuration; None when the row is no longer interrupted (another
        process filled it)."""
        with self.transaction() as s:
            row = s.get(ApplyRow, apply_id, with_for_update=True)
            if row is None or row.state not in UNFOLLOWED:
                return None
            why = row.note if row.state == "detached" and row.note else (
                f"the process applying it ({row.holder}) ended before the apply did")
            note = f"{why}; filled from the server's record of apply {row.server_apply_id}"
            new = None
            if record.get("outcome") == "applied" and record.get("target"):
                new, missed = self._produced(s, row, record, model)
                if missed:
                    note += f"; {missed}"
            measured = record.get("measured") or {}
            row.state, row.outcome, row.to_id = "done", record.get("outcome") or "failed", new.id if new else None
            row.note, row.error = note, record.get("error") or None
            row.phases = record.get("phases") or row.phases
            row.bytes_moved = int(measured.get("bytes_moved") or row.bytes_moved or 0)
            row.stall_ms = measured.get("stall_ms")
            row.serving = serving
            row.finished_at = _server_time(record.get("finished_at"), row.started_at)
            return row, new

    @staticmethod
    def _produced(s: Session, row: ApplyRow, record: dict[str, Any],
                  model: str) -> tuple[ConfigurationRow | None, str | None]:
        """Returns the configuration the applied `record` produced, recording it after the one the
        apply started from as its process would have, and None with the reason when the record
        has moved on since without it."""
        start = s.get(ConfigurationRow, row.from_id) if row.from_id is not None else None
        lineage = start.lineage if start is not None else None
        target, epoch = record["target"]["pipelines"], record.get("epoch_to")
        since = select(ConfigurationRow).where(ConfigurationRow.id > (row.from_id or 0)).order_by(ConfigurationRow.id)
        if lineage is not None:
            since = since.where(ConfigurationRow.lineage == lineage)
        for c in s.scalars(since):  # a refresh recorded it already (as `observed`)
            if c.epoch == epoch and stage_layout(c.pipelines) == stage_layout(target):
                return c, None
        newest = _newest(s, lineage)
        if newest is not None and start is not None and newest.id != start.id:
            return None, (f"the store recorded serial {newest.serial} since, so the configuration it produced "
                          f"(epoch {epoch}) is not recorded")
        created = _server_time(record.get("finished_at"), newest.created_at if newest is not None else row.started_at)
        return _add_configuration(s, model, target, row.source or "apply", epoch=epoch, predicted=record.get("predicted"),
                                  lineage=lineage, created_at=created), None

    def apply(self, apply_id: str) -> ApplyRow:
        self.reap_interrupted()
        with self.transaction() as s:
            return _get(s, ApplyRow, apply_id, f"no apply {apply_id}: `pipeshift history` lists them")

    def applies(self) -> list[ApplyRow]:
        self.reap_interrupted()
        with self.transaction() as s:
            return list(s.scalars(select(ApplyRow).order_by(ApplyRow.started_at, ApplyRow.id)))

    # ---- controller decisions ---------------------------------------------------------------
    def record_decision(self, serial: int, mode: str, act: bool, reason: str, current: dict[str, Any],
                        target: dict[str, Any], predicted: dict[str, Any], workload: dict[str, Any],
                        decided_at: datetime | None = None, plan_id: str | None = None,
                        server_apply_id: str | None = None, error: str | None = None,
                        holder: str | None = None) -> DecisionRow:
        """Writes one decision of the live controller, acting or not."""
        with self.transaction() as s:
            row = DecisionRow(serial=serial, holder=holder or this_process(), mode=mode, act=act, reason=reason,
                              current=current, target=target, predicted=predicted, workload=workload,
                              plan_id=plan_id, server_apply_id=server_apply_id, error=error,
                              decided_at=decided_at or utc_now())
            s.add(row)
            s.flush()
            return row

    def prune_decisions(self, keep: int) -> int:
        """Deletes all but the newest `keep` decisions; returns how many went. Configurations
        and applies are never pruned: they are the history a rollback reads."""
        if keep < 0:
            raise ValueError(f"keep must be >= 0, got {keep}")
        with self.transaction() as s:
            newest = s.scalars(select(DecisionRow.id).order_by(DecisionRow.id.desc()).offset(keep).limit(1)).first()
            if newest is None:
                return 0
            return s.execute(delete(DecisionRow).where(DecisionRow.id <= newest)).rowcount or 0

    def decisions(self, limit: int | None = None) -> list[DecisionRow]:
        """Returns the controller's decisions, oldest first (the newest `limit` when given)."""
        with self.transaction() as s:
            query = select(DecisionRow).order_by(DecisionRow.id.desc())
            if limit is not None:
                query = query.limit(limit)
            return list(reversed(s.scalars(query).all()))

    # ---- locks ------------------------------------------------------------------------------
    def lock(self, name: str, reason: str, holder: str | None = None) -> LockRow:
        """Takes the lock on `name`, or raises LockHeld saying who holds it."""
        row = LockRow(id=str(uuid.uuid4()), name=name, holder=holder or this_process(), reason=reason)
        try:
            with self.transaction() as s:
                s.add(row)
        except IntegrityError:
            with self.transaction() as s:
                held = s.scalars(select(LockRow).where(LockRow.name == name)).first()
            if held is None:  # released meanwhile
                return self.lock(name, reason, holder)
            raise LockHeld(held) from None
        return row

    def unlock(self, lock_id: str) -> None:
        with self.transaction() as s:
            row = s.get(LockRow, lock_id)
            if row is not None:
                s.delete(row)

    def force_unlock(self, lock_id: str) -> LockRow:
        with self.transaction() as s:
            row = s.get(LockRow, lock_id)
            if row is None:
                held = [lock.id for lock in s.scalars(select(LockRow))]
                raise UnknownId(f"no lock {lock_id}" + (f"; held now: {', '.join(held)}" if held else "; nothing is locked"))
            s.delete(row)
            return row

    def locks(self) -> list[LockRow]:
        with self.transaction() as s:
            return list(s.scalars(select(LockRow)))

    # ---- history ----------------------------------------------------------------------------
    def history(self, decisions: bool = False) -> list[dict[str, Any]]:
        """Returns configurations, applies and device events (and the controller's decisions,
        when asked) in the order they happened."""
        events: list[tuple[datetime, int, dict[str, Any]]] = []
        for c in self.configurations():
            events.append((c.created_at, 0, {
                "type": "configuration", "id": c.id, "serial": c.serial, "lineage": c.lineage,
                "source": c.source, "epoch": c.epoch, "at": c.created_at.isoformat(),
                "pipelines": c.pipelines, "model": c.model, "server": c.server, "note": c.note,
            }))
        for a in self.applies():
            events.append((a.started_at, 1, {
                "type": "apply", "id": a.id, "state": a.state, "outcome": a.outcome, "error": a.error, "note": a.note,
                "from": a.from_id, "to": a.to_id, "plan": a.plan_id, "source": a.source, "at": a.started_at.isoformat(),
                "bytes_moved": a.bytes_moved, "stall_ms": a.stall_ms,
            }))
        for e in self.device_events():
            events.append((e.at, 2, {
                "type": "device", "id": e.id, "device": e.device, "kind": e.kind, "node": e.node,
                "from": e.state_from, "to": e.state_to, "at": e.at.isoformat(),
            }))
        for d in self.decisions() if decisions else ():
            events.append((d.decided_at, 3, decision_event(d)))
        return [e for _, _, e in sorted(events, key=lambda e: (e[0].replace(tzinfo=None), e[1]))]


def decision_event(d: DecisionRow) -> dict[str, Any]:
    """Returns a decision as `pipeshift history --decisions` and its JSON list it."""
    return {
        "type": "decision", "id": d.id, "serial": d.serial, "at": d.decided_at.isoformat(), "mode": d.mode,
        "act": d.act, "reason": d.reason, "current": d.current, "target": d.target, "predicted": d.predicted,
        "workload": d.workload, "plan": d.plan_id, "server_apply_id": d.server_apply_id, "error": d.error,
        "holder": d.holder,
    }
