"""What a user does to a deployment, written once for the CLI and the REST API: plan a spec
against what serves (refreshing the store's record first), save that plan, and apply a saved
plan, a recorded configuration (rollback) or any target under the deployment's lock, recording
the apply as it goes.

Every failure is an `OperationError` whose `status` is the HTTP answer the REST API gives and
whose message says what to do; the CLI prints the message and exits 1 (2 for bad input).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from planner.admin_client import AdminClient, AdminError
from planner.configuration import Configuration
from planner.deployment_state import ApplyRecorder, Refreshed, lock_name, plan_spec, refresh
from planner.spec import Spec, SpecError
from planner.store import LockHeld, StalePlan, Store, UnknownId
from planner.store.models import ApplyRow, ConfigurationRow, LockRow, PlanRow

POLL_S = 0.1
SETTLE_S = 3.0  # how long serving is watched after an apply, for its TTFT/TPOT "after"


# follower(client, server apply id, on_update) -> the final record
Follower = Callable[[AdminClient, str, Callable[[dict[str, Any]], None]], dict[str, Any]]


class OperationError(RuntimeError):
    """An operation refused; `status` is the REST API's answer (404, 409, 422, 503)."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


def _from_admin(exc: AdminError) -> OperationError:
    """Maps a failed admin call: unreachable -> 503; the server's own 4xx keeps its status."""
    if exc.status is None or exc.status >= 500:
        return OperationError(str(exc), 503)
    return OperationError(str(exc), 409 if exc.status == 409 else 422)


@dataclass
class PlannedChange:
    """A spec planned against what serves: the target and the server's diff of it."""

    refreshed: Refreshed
    target: Configuration
    dry: dict[str, Any]  # the admin API's dry run: {"plan", "text", "feasible"}

    @property
    def has_changes(self) -> bool:
        return bool(self.dry["plan"].get("has_changes", True))


UNUSABLE_STATES = ("dead", "drained", "draining")  # devices a plan may not use (`pipeshift device add` re-admits)


def plan_change(
    store: Store, client: AdminClient, spec: Spec, time_limit_s: float, backend: str = "cpsat"
) -> PlannedChange:
    """Refreshes the store from the server, plans `spec` from what serves and asks the server
    for the diff. Raises OperationError: 409 when the spec does not fit this deployment (its
    model, its devices, infeasible), 503 when the server does not answer."""
    try:
        deployment = client.deployment()
    except AdminError as exc:
        raise _from_admin(exc) from None
    refreshed = refresh(store, deployment, client)
    unusable = {d["name"]: d["state"] for d in deployment["devices"] if d["state"] in UNUSABLE_STATES}
    names = [d["name"] for d in deployment["devices"] if d["name"] not in unusable]
    try:
        target = plan_spec(spec, deployment, names, time_limit_s, backend=backend)
    except (SpecError, ValueError) as exc:
        left_out = ", ".join(f"{name} {state}" for name, state in unusable.items())
        raise OperationError(str(exc) + (f" (left out: {left_out})" if left_out else ""), 409) from None
    try:
        dry = client.plan({"target": target.to_json()})
    except AdminError as exc:
        raise _from_admin(exc) from None
    return PlannedChange(refreshed, target, dry)


def save_plan(store: Store, change: PlannedChange, spec: dict[str, Any] | None) -> PlanRow:
    plan = change.dry["plan"]
    return store.save_plan(change.refreshed.current, change.target.to_json()["pipelines"], plan,
                           plan.get("prediction", {}), change.dry["text"], spec=spec)


class ApplyRun:
    """One apply of a deployment: `prepare` takes the lock, refreshes the record, checks a
    saved plan is fresh and asks the server for the diff; `start` begins it on the server and
    its row in the store; `follow` records it until it ends; `close` frees the lock."""

    def __init__(self, store: Store | None, client: AdminClient, source: str = "apply"):
        self.store, self.client, self.source = store, client, source
        self.lock: LockRow | None = None
        self.deployment: dict[str, Any] = {}
        self.refreshed: Refreshed | None = None
        self.body: dict[str, Any] = {}
        self.plan_id: str | None = None
        self.dry: dict[str, Any] = {}
        self.recorder: ApplyRecorder | None = None
        self.server_apply_id: str | None = None
        self.max_overhead: float | None = None

    def prepare(self, *, plan_id: str | None = None, configuration_id: int | None = None,
                target: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
                max_overhead: float | None = None, recompute_overflow: bool = False) -> dict[str, Any]:
        """Returns the server's dry run of the change to the saved plan `plan_id`, the recorded
        configuration `configuration_id`, or `target(deployment)` (an admin API target body);
        `recompute_overflow`: running requests whose KV memory cannot hold through the change
        recompute it instead of the apply being refused (always for a saved plan that does so).
        Holds the lock from here until `close` (taken first, as Terraform does, so that what
        is planned is what is applied)."""
        self.max_overhead = max_overhead
        self._lock()
        try:
            self._refresh()
            if plan_id is not None:
                plan_row = self._store().plan(plan_id)
                self._store().check_fresh(plan_row)
                self.plan_id, self.body = plan_row.id, {"target": {"pipelines": plan_row.target}}
                # a saved plan is applied as it was made: where it drops KV that does not fit
                # (a controller's proposal may), so does its apply
                recompute_overflow = recompute_overflow or bool(plan_row.diff.get("recompute"))
            elif configuration_id is not None:
                self.body = {"target": {"pipelines": self._store().configuration(configuration_id).pipelines}}
            else:
                assert target is not None
                self.body = target(self.deployment)
            if recompute_overflow:
                self.body["recompute_overflow"] = True
            self.dry = self.client.plan(self.body, max_overhead)
        except UnknownId as exc:
            raise OperationError(str(exc), 404) from None
        except StalePlan as exc:
            raise OperationError(str(exc), 409) from None
        except AdminError as exc:
            raise _from_admin(exc) from None
        except ValueError as exc:
            raise OperationError(str(exc), 422) from None
        return self.dry

    def _lock(self, reason: str | None = None) -> None:
        """Takes the deployment's lock (with a store); raises OperationError 409 when it is held."""
        if self.store is not None:
            try:
                self.lock = self.store.lock(lock_name(self.client.server), reason=reason or f"pipeshift {self.source}")
            except LockHeld as exc:
                raise OperationError(str(exc), 409) from None

    def _refresh(self) -> None:
        """Reads what the server serves and makes it the store's record (raises AdminError)."""
        self.deployment = self.client.deployment()
        if self.store is not None:
            self.refreshed = refresh(self.store, self.deployment, self.client)

    def drain(self, device: str) -> dict[str, Any]:
        """Drains `device` (`POST /admin/v1/devices/{device}/drain`) under the deployment's lock,
        as an apply: refreshes the record first, and when the drain starts an apply, writes its
        row, which `follow` completes (its configuration's source is `drain`).
        Returns the admin API's answer. Raises OperationError (404 unknown device, 409 lock held
        or drain refused, 503 server gone)."""
        self._lock(f"pipeshift device drain {device}")
        try:
            self._refresh()
            answer = self.client.drain(device)
        except AdminError as exc:
            raise OperationError(str(exc), 503 if exc.status is None or exc.status >= 500 else exc.status) from None
        started = answer.get("apply")
        if started is None:  # nothing moved; the device's state changed, or not
            self.refresh_devices()
        elif self.store is not None and self.refreshed is not None:
            self.recorder = ApplyRecorder(self.store, self.refreshed.current, source="drain")
            self.recorder.started(started["id"])
        if started is not None:
            self.server_apply_id = started["id"]
        return answer

    def refresh_devices(self) -> list[str]:
        """Records the devices' states as the server reports them now (drained, spare, ...);
        nothing when there is no store or the server does not answer. Returns the lines of the
        interrupted or detached applies the refresh completed (`Refreshed.filled`), after the
        line saying the deployment moved, when it did (`Refreshed.moved`). Raises
        OperationError (409) when the store holds another deployment's history."""
        if self.store is None:
            return []
        try:
            refreshed = refresh(self.store, self.client.deployment(), self.client)
        except AdminError:
            return []
        return refreshed.notes

    @property
    def drift(self) -> str | None:
        return self.refreshed.drift if self.refreshed is not None else None

    @property
    def moved(self) -> str | None:
        """The deployment answers at another address than the store recorded (it moved)."""
        return self.refreshed.moved if self.refreshed is not None else None

    @property
    def notes(self) -> list[str]:
        """The refresh's notes: the deployment moved, interrupted applies filled in."""
        return self.refreshed.notes if self.refreshed is not None else []

    @property
    def filled(self) -> list[str]:
        """The interrupted applies the refresh completed from the server's records."""
        return self.refreshed.filled if self.refreshed is not None else []

    @property
    def has_changes(self) -> bool:
        return bool(self.dry["plan"].get("has_changes", True))

    def start(self) -> ApplyRow | None:
        """Starts the prepared apply on the server; returns its row (None without a store)."""
        if self.store is not None and self.refreshed is not None:
            self.recorder = ApplyRecorder(self.store, self.refreshed.current, self.plan_id, source=self.source)
        try:
            started = self.client.apply(self.body, self.max_overhead, expected_epoch=self.deployment["epoch"])
        except AdminError as exc:
            if self.recorder is not None:
                self.recorder.failed(str(exc))
            raise _from_admin(exc) from None
        self.server_apply_id = started["id"]
        if self.recorder is not None:
            self.recorder.started(started["id"])
            return self.recorder.row
        return None

    def follow(self, follower: Follower | None = None,
               settle_s: float = SETTLE_S) -> tuple[dict[str, Any], ConfigurationRow | None]:
        """Follows the apply until it ends, with `follower(client, apply_id, on_update)` (the
        CLI's progress bars) or by plain polling; records phases, outcome and the serving
        figures measured around it. Returns the final record and the configuration it produced."""
        assert self.server_apply_id is not None
        try:
            if follower is not None:
                record = follower(self.client, self.server_apply_id, self._progress)
            else:
                record = self.client.wait(self.server_apply_id, POLL_S, on_update=self._progress)
        except AdminError as exc:  # the server went away (or forgot the apply) mid-apply
            message = f"lost the deployment while following apply {self.server_apply_id}: {exc}"
            if self.recorder is not None:
                self.recorder.failed(message)
            raise OperationError(message + "; `pipeshift plan --server` shows what serves now, if anything",
                                 503) from None
        new = None
        if self.recorder is not None:  # the row says done once it holds everything
            new = self.recorder.finished(record, self.deployment.get("model", "?"), self.serving(settle_s))
        return record, new

    def serving(self, settle_s: float) -> dict[str, Any] | None:
        """Returns TTFT/TPOT before, during and after the apply and the token times of the
        requests that streamed through it, after watching `settle_s` more of serving when
        requests are streaming (None when the server cannot say)."""
        try:
            report = self.client.serving(self.server_apply_id)
            if report.get("streams") and settle_s > 0:
                time.sleep(settle_s)
                report = self.client.serving(self.server_apply_id)
        except AdminError:
            return None
        return report

    def _progress(self, record: dict[str, Any]) -> None:
        if self.recorder is not None:
            self.recorder.progress(record)

    def close(self) -> None:
        if self.lock is not None and self.store is not None:
            self.store.unlock(self.lock.id)
            self.lock = None

    def _store(self) -> Store:
        if self.store is None:
            raise OperationError("this needs the store: run `pipeshift init`", 422)
        return self.store

    def follow_in_background(self) -> threading.Thread:
        """Follows and closes the apply on a thread of its own (the REST API answers 202)."""

        def run() -> None:
            try:
                self.follow()
            except OperationError:  # the server went away mid-apply: follow said so in the row
                pass
            except Exception as exc:  # anything else: say so in the row
                if self.recorder is not None:
                    self.recorder.failed(f"lost the deployment while following the apply: {exc}")
            finally:
                self.close()

        thread = threading.Thread(target=run, name=f"apply-{self.server_apply_id}", daemon=True)
        thread.start()
        return thread
