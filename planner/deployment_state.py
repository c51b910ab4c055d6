"""What the CLI (and the REST API) do around a running deployment: plan a spec from what it
serves, refresh the store's record from the server (reporting drift, and filling in the applies a
killed process left interrupted), save a plan to a file and load it back, and record an apply as
it progresses."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from planner.configuration import Configuration, read_json_file
from planner.spec import Spec
from planner.store import Store
from planner.store.models import ConfigurationRow, PlanRow
from planner.store.records import stage_layout

if TYPE_CHECKING:
    from planner.admin_client import AdminClient

PLAN_FILE_FORMAT = "pipeshift-plan/1"
PROGRESS_WRITE_S = 1.0  # how often an apply's row is rewritten while it runs


def lock_name(server: str) -> str:
    return f"deployment at {server.rstrip('/')}"


@dataclass
class Refreshed:
    current: ConfigurationRow
    drift: str | None  # what differs from the record, when something does
    filled: list[str] = field(default_factory=list)  # interrupted applies completed from the server
    moved: str | None = None  # the deployment answers at another address than the one recorded

    @property
    def notes(self) -> list[str]:
        """What a command says before its own output: the deployment moved, applies filled in."""
        return [self.moved, *self.filled] if self.moved else self.filled


PROBE_S = 2.0  # how long a refresh waits for the recorded server when another one is read


def deployment_address(server: str) -> str:
    """Returns the server's admin URL as the store records it: `http://host:port`, scheme and
    host in lower case, no trailing slash."""
    from planner.admin_client import server_url

    url = server_url(server)
    scheme, sep, rest = url.partition("://")
    host, slash, path = rest.partition("/")
    return f"{scheme.lower()}{sep}{host.lower()}{slash}{path}"


def _workers(deployment: dict[str, Any]) -> list[tuple[str, int]] | None:
    """Returns the (name, pid) of every worker of a deployment, None when it does not say them."""
    devices = deployment.get("devices") if isinstance(deployment, dict) else None
    if not devices or any(not isinstance(d, dict) or not isinstance(d.get("pid"), int) for d in devices):
        return None
    return sorted((str(d.get("name")), d["pid"]) for d in devices)


def _recorded_answers(recorded: str, deployment: dict[str, Any], client: AdminClient) -> str:
    """Asks the server the store recorded the deployment at (`recorded`) for its deployment, once
    and briefly. Returns `same` when it is `deployment`, read with `client` (the same workers: one
    server under two addresses), `other` when another deployment answers there, `gone` when
    nothing pipeshift answers there."""
    from planner.admin_client import AdminClient, AdminError

    try:
        there = AdminClient(recorded, client.token, timeout_s=PROBE_S).deployment()
    except AdminError as exc:
        # nothing listens, or something that is not a pipeshift admin API took the port
        return "gone" if exc.status is None or exc.status == 404 else "other"
    except ValueError:  # an answer that is not JSON: not a pipeshift server
        return "gone"
    workers = _workers(there)
    return "same" if workers is not None and workers == _workers(deployment) else "other"


def other_deployment(recorded: str, here: str) -> str:
    """Says that the store holds another deployment's history, and how to keep the two apart."""
    return (f"this store holds the history of the deployment at {recorded}, which still answers; {here} is "
            "another deployment, so nothing was recorded: give it a store of its own "
            "(`pipeshift init --database-url sqlite:///PATH/other.db`, then that --database-url, or "
            "PIPESHIFT_DATABASE_URL, with every command for it)")


def locate(store: Store, deployment: dict[str, Any], client: AdminClient | None) -> tuple[str | None, str | None]:
    """Returns where the store records the `deployment` read with `client` (None without a client:
    where its configurations are) and, when it moved there, from where. Raises OperationError
    (409) when the store's current configuration was recorded at another server that still
    answers with another deployment; records nothing."""
    here = deployment_address(client.server) if client is not None else None
    recorded = store.current()
    if here is None or recorded is None or recorded.server is None or recorded.server == here:
        return here, None
    answer = _recorded_answers(recorded.server, deployment, client)
    if answer == "other":
        from planner.operations import OperationError

        raise OperationError(other_deployment(recorded.server, here), 409)
    if answer == "same":  # one deployment, two addresses: the store keeps the one it has
        return recorded.server, None
    return here, f"moved from {recorded.server}, which no longer answers, to {here}"


def refresh(store: Store, deployment: dict[str, Any], client: AdminClient | None = None) -> Refreshed:
    """Makes the store's current configuration the one the server serves (recording it when it
    differs) and its devices the server's; says what drifted from the record. With the server's
    `client`, first fills in the applies a killed process left interrupted that the server has
    finished since (`fill_interrupted`), so that what they produced is not reported as drift.

    A store is the history of one deployment. With the `client`, a refresh from another server
    than the one the current configuration was recorded at asks that one (briefly) whether it
    still answers: when another deployment does, the refresh records nothing and raises
    OperationError (409) saying how to give this one a store of its own; when nothing does, the
    deployment moved (a restart at another address): the refresh records it at the new address,
    with a note saying where it moved from. A configuration recorded without a server (before
    migration 0005) adopts the client's."""
    at, moved = locate(store, deployment, client)
    filled = fill_interrupted(store, client, deployment.get("model", "?")) if client is not None else []
    store.record_devices(
        [
            {
                "name": d["name"],
                "kind": d.get("kind", "cpu"),
                "node": d.get("node", "local"),
                "state": d["state"],
            }
            for d in deployment["devices"]
        ]
    )
    served = deployment["configuration"]["pipelines"]
    recorded = store.current()
    if recorded is not None and stage_layout(recorded.pipelines) == stage_layout(served) and moved is None:
        if recorded.server is None and at is not None:
            recorded = store.adopt_server(recorded.id, at)
        return Refreshed(recorded, None, filled)
    drift = None
    if recorded is not None and stage_layout(recorded.pipelines) != stage_layout(served):
        drift = (
            f"the deployment serves epoch {deployment['epoch']} with a configuration other than the one "
            f"recorded last (serial {recorded.serial}); recorded it as serial {recorded.serial + 1}"
        )
    row = store.record_configuration(
        deployment.get("model", "?"), served, "observed", epoch=deployment["epoch"], server=at,
        note=f"the deployment {moved}" if moved else None,
    )
    if moved:
        moved = f"the deployment this store records {moved}; recorded it there as serial {row.serial}"
    return Refreshed(row, drift, filled, moved)


def fill_interrupted(store: Store, client: AdminClient, model: str) -> list[str]:
    """Completes every interrupted apply (its process was killed, `pipeshift history` says
    `interrupted`) whose apply the server has finished since, from the server's record of it:
    outcome, phases, figures and the configuration it produced, as its process would have
    written them. One the server no longer knows (it restarted) stays interrupted, as does one
    still running there (a later refresh fills it). Returns one line per apply filled."""
    from planner.admin_client import AdminError

    rows = store.interrupted()
    if not rows:
        return []
    try:
        known = {r["id"]: r for r in client.applies()}
    except AdminError:  # the server cannot say now: the rows wait for the next refresh
        return []
    lines = []
    for row in rows:
        record = known.get(row.server_apply_id)
        if record is None or record.get("state") != "done":
            continue
        try:
            serving = client.serving(record["id"])
        except AdminError:
            serving = None
        filled = store.fill_interrupted(row.id, record, model, serving)
        if filled is None:
            continue
        done, new = filled
        produced = f", configuration {new.id} (serial {new.serial}, epoch {new.epoch})" if new is not None else ""
        # A detached apply (`device drain --no-wait`) was left to the server on purpose.
        how = ("left to the server when its process" if row.state == "detached"
               else "interrupted when its process")
        lines.append(f"apply {done.id}, {how} ({done.holder}) ended, was filled from the "
                     f"server's record of apply {done.server_apply_id}: {done.outcome}{produced}")
    return lines


def plan_from_spec(
    path: str, deployment: dict[str, Any], names: list[str], time_limit_s: float
) -> Configuration:
    """plan_spec of the spec file at `path`; raises ValueError saying what is wrong."""
    from planner.spec import SpecError, load_spec

    try:
        spec = load_spec(path)
    except SpecError as exc:
        raise ValueError("\n".join(exc.lines)) from None
    return plan_spec(spec, deployment, names, time_limit_s, source=path)


def plan_spec(
    spec: Spec,
    deployment: dict[str, Any],
    names: list[str],
    time_limit_s: float,
    source: str = "the spec",
    backend: str = "cpsat",
) -> Configuration:
    """Plans the spec with the server's configuration as the current one (the migration
    term then prices what moves); the spec's devices stand for the server's, in order.
    Raises ValueError saying what is wrong (device count, infeasible)."""
    from cost_models.model_catalog import get_model_arch
    from planner.operating_batch import plan_fitting_batch
    from planner.spec import CurrentConfig, SpecError

    if spec.models is not None:
        raise ValueError(f"{source} lists {len(spec.models)} models; a deployment serves one: "
                         "plan the pool with `pipeshift plan -f SPEC` and serve each model on its own")
    spec = spec.model_copy(deep=True)
    served = deployment.get("model") or ""
    try:
        served_arch = get_model_arch(served).name
    except KeyError:  # a model the catalog does not know (a local directory): nothing to compare
        served_arch = spec.model
    if served_arch != spec.model:
        raise ValueError(f"{source} plans {spec.model}; the deployment serves {served}")
    spec_names = [n for n, _, _ in spec.device_names()]
    if len(spec_names) != len(names):
        raise ValueError(
            f"{source} lists {len(spec_names)} devices; the server has {len(names)} "
            f"({', '.join(names)}): list one device per worker"
        )
    to_spec, to_server = (
        dict(zip(names, spec_names, strict=True)),
        dict(zip(spec_names, names, strict=True)),
    )
    current = deployment["configuration"]
    spec.current = CurrentConfig.model_validate(
        {
            "pipelines": [
                {"stages": [{**s, "device": to_spec[s["device"]]} for s in p["stages"]]}
                for p in current["pipelines"]
            ]
        }
    )
    try:
        _, result = plan_fitting_batch(spec, backend=backend, time_limit_s=time_limit_s)
    except SpecError as exc:
        raise ValueError("\n".join(exc.lines)) from None
    if result.objective is None:
        raise ValueError(f"{source}: {result.message}")
    planned = Configuration.from_json(result.to_json())
    return Configuration.from_json(
        {
            "pipelines": [
                {
                    "stages": [
                        {"device": to_server[s.device], "start": s.start, "end": s.end}
                        for s in p.stages
                    ]
                }
                for p in planned.pipelines
            ]
        }
    )


def write_plan_file(path: str | Path, plan: PlanRow, server: str, database: str) -> None:
    Path(path).write_text(
        json.dumps(
            {
                "format": PLAN_FILE_FORMAT,
                "plan_id": plan.id,
                "lineage": plan.lineage,
                "serial": plan.serial,
                "server": server,
                "database": database,
                "target": {"pipelines": plan.target},
            },
            indent=2,
        )
        + "\n"
    )


def read_plan_file(path: str | Path) -> dict[str, Any]:
    """Returns a saved plan file's content; raises ValueError saying what is wrong with it."""
    obj = read_json_file(path, str(path))
    if not isinstance(obj, dict) or obj.get("format") != PLAN_FILE_FORMAT:
        raise ValueError(
            f"{path}: not a saved plan (`pipeshift plan -f SPEC -out {path}` writes one)"
        )
    return obj


class ApplyRecorder:
    """Writes one apply's row as the server reports it: begun, its phases while it runs (at
    most once a second), and its end with the configuration it produced."""

    def __init__(
        self,
        store: Store,
        current: ConfigurationRow,
        plan_id: str | None = None,
        spec: dict[str, Any] | None = None,
        source: str = "apply",
    ):
        self.store, self.current, self.spec, self.source = store, current, spec, source
        self.row = store.begin_apply(plan_id, current.id, source)
        self._written = 0.0

    def started(self, server_apply_id: str) -> None:
        self.store.update_apply(self.row.id, server_apply_id=server_apply_id)

    def progress(self, record: dict[str, Any]) -> None:
        if time.monotonic() - self._written >= PROGRESS_WRITE_S:
            self._written = time.monotonic()
            self.store.update_apply(
                self.row.id,
                phases=record["phases"],
                bytes_moved=int(record["measured"]["bytes_moved"] or 0),
            )

    def finished(
        self, record: dict[str, Any], model: str, serving: dict[str, Any] | None = None
    ) -> ConfigurationRow | None:
        """Records the outcome (and the serving figures around the apply); returns the new
        configuration when the apply took effect."""
        new = None
        if record["outcome"] == "applied" and record.get("target"):
            new = self.store.record_configuration(
                model,
                record["target"]["pipelines"],
                self.source,
                epoch=record["epoch_to"],
                predicted=record["predicted"],
                spec=self.spec,
                lineage=self.current.lineage,
            )
        measured = record["measured"]
        self.store.finish_apply(
            self.row.id,
            record["outcome"],
            record.get("error"),
            to_id=new.id if new else None,
            phases=record["phases"],
            bytes_moved=int(measured["bytes_moved"] or 0),
            stall_ms=measured["stall_ms"],
            serving=serving,
        )
        return new

    def failed(self, error: str) -> None:
        self.store.finish_apply(self.row.id, "failed", error)
