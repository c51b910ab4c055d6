"""The planner REST API: `create_planner_app(store, server)`.

    POST /v1/plans              plan a spec against what the deployment serves; saved (201)
    GET  /v1/plans/{id}         a saved plan
    POST /v1/applies            apply exactly a saved plan (202; 200 when nothing changes)
    GET  /v1/applies/{id}       an apply's phases, figures and outcome, as recorded
    GET  /v1/configurations     every configuration recorded, oldest first
    GET  /v1/history            configurations, applies and device changes in the order they happened
    POST /v1/rollback           plan and apply a return to a recorded configuration
    GET  /v1/cluster            devices, current configuration, epoch

It calls the functions the CLI calls (planner/operations.py). Mutations need
`Authorization: Bearer TOKEN` when a token is configured (PIPESHIFT_API_TOKEN); without one
they are taken from this host only, and `pipeshift planner` refuses to listen elsewhere.
Refusals answer `{"detail": "..."}`: 400 a body that is not JSON, 401 no token, 403 not this host, 404 unknown id,
409 lock held, stale plan, a spec this deployment cannot serve (other model, other
number of devices, infeasible), or a store holding another deployment's history, 422 bad
body (FastAPI's list of fields), 503 the deployment does not answer.
"""

from __future__ import annotations

import hmac

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse

from agent.gateway.server import is_loopback
from planner.admin_client import AdminClient, AdminError
from planner.api.models import (
    ApplyOut,
    ApplyRequest,
    ApplyStarted,
    Cluster,
    ConfigurationList,
    ConfigurationOut,
    History,
    PlanOut,
    PlanRequest,
    Problem,
    RollbackRequest,
)
from planner.operations import ApplyRun, OperationError, plan_change, save_plan
from planner.store import Store, UnknownId
from planner.store.records import stage_layout

TOKEN_VARIABLE = "PIPESHIFT_API_TOKEN"


def _answers(*statuses: int) -> dict[int | str, dict]:
    return {status: {"model": Problem} for status in statuses}


def create_planner_app(store: Store, server: str, admin_token: str | None = None,
                       api_token: str | None = None) -> FastAPI:
    """Returns the planner API over `store`, changing the deployment served at `server`
    (whose admin API takes `admin_token`). `api_token` guards the mutations."""
    app = FastAPI(title="pipeshift planner", version="1",
                  summary="Plan, apply, roll back and audit a pipeshift deployment's configuration")
    app.state.store = store

    def client() -> AdminClient:
        return AdminClient(server, admin_token)

    def authorize(request: Request) -> None:
        if api_token:
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_token.encode()):
                raise HTTPException(401, f"this needs `Authorization: Bearer TOKEN` (the planner's {TOKEN_VARIABLE})",
                                    headers={"WWW-Authenticate": "Bearer"})
        elif not is_loopback(request.client.host if request.client else ""):
            raise HTTPException(403, f"without {TOKEN_VARIABLE} the planner takes changes from its own host only")

    @app.exception_handler(OperationError)
    async def operation_refused(request: Request, exc: OperationError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    @app.exception_handler(UnknownId)
    async def unknown_id(request: Request, exc: UnknownId) -> JSONResponse:
        return JSONResponse({"detail": str(exc.args[0])}, status_code=404)

    mutation = {"dependencies": [Depends(authorize)]}

    @app.post("/v1/plans", status_code=201, response_model=PlanOut, responses=_answers(400, 401, 403, 409, 422, 503),
              **mutation)
    def create_plan(body: PlanRequest) -> JSONResponse:
        change = plan_change(store, client(), body.spec.to_spec(), body.time_limit_s)
        if not change.dry["feasible"]:
            raise OperationError(f"the deployment cannot carry out this plan:\n{change.dry['text']}", 409)
        row = save_plan(store, change, body.spec.model_dump(mode="json", exclude_none=True))
        out = PlanOut.of(row, change.refreshed.drift, change.refreshed.moved)
        return JSONResponse(out.model_dump(mode="json"), status_code=201, headers={"Location": f"/v1/plans/{row.id}"})

    @app.get("/v1/plans/{plan_id}", responses=_answers(404))
    def get_plan(plan_id: str) -> PlanOut:
        return PlanOut.of(store.plan(plan_id))

    def start(run: ApplyRun, **target) -> JSONResponse:
        try:
            dry = run.prepare(**target)
            if not dry["feasible"]:
                raise OperationError(f"the deployment cannot carry out this change:\n{dry['text']}", 409)
            if not run.has_changes:
                run.close()
                return JSONResponse(ApplyStarted(apply=None, has_changes=False, text=dry["text"],
                                                 drift=run.drift, moved=run.moved).model_dump(mode="json"))
            row = run.start()
        except BaseException:
            run.close()
            raise
        run.follow_in_background()
        out = ApplyStarted(apply=ApplyOut.of(row), has_changes=True, text=dry["text"], drift=run.drift,
                           moved=run.moved)
        return JSONResponse(out.model_dump(mode="json"), status_code=202, headers={"Location": f"/v1/applies/{row.id}"})

    @app.post("/v1/applies", status_code=202, response_model=ApplyStarted,
              responses={200: {"model": ApplyStarted, "description": "nothing to change"},
                         **_answers(400, 401, 403, 404, 409, 422, 503)}, **mutation)
    def create_apply(body: ApplyRequest) -> JSONResponse:
        return start(ApplyRun(store, client()), plan_id=body.plan_id, max_overhead=body.max_overhead)

    @app.get("/v1/applies/{apply_id}", responses=_answers(404))
    def get_apply(apply_id: str) -> ApplyOut:
        return ApplyOut.of(store.apply(apply_id))

    @app.get("/v1/configurations")
    def list_configurations() -> ConfigurationList:
        return ConfigurationList(data=[ConfigurationOut.of(c) for c in store.configurations()])

    @app.get("/v1/history")
    def history(decisions: bool = Query(False, description="also the live controller's decisions, "
                                        "acting or not, with their reasons and predicted figures")) -> History:
        return History.model_validate({"data": store.history(decisions=decisions)})

    @app.post("/v1/rollback", status_code=202, response_model=ApplyStarted,
              responses={200: {"model": ApplyStarted, "description": "nothing to change"},
                         **_answers(400, 401, 403, 404, 409, 422, 503)}, **mutation)
    def rollback(body: RollbackRequest) -> JSONResponse:
        return start(ApplyRun(store, client(), source="rollback"), configuration_id=body.configuration_id,
                     max_overhead=body.max_overhead)

    @app.get("/v1/cluster")
    def cluster() -> Cluster:
        current = store.current()
        recorded = ConfigurationOut.of(current) if current is not None else None
        try:
            deployment = client().deployment()
        except AdminError as exc:
            devices = [{"name": d.name, "kind": d.kind, "state": d.state, "node": d.node} for d in store.devices()]
            return Cluster(server=server, reachable=False, error=str(exc), devices=devices, configuration=recorded)
        serving = deployment["configuration"]["pipelines"]
        drift = current is not None and stage_layout(current.pipelines) != stage_layout(serving)
        return Cluster(server=server, reachable=True, model=deployment.get("model"), epoch=deployment["epoch"],
                       devices=deployment["devices"], serving=serving, configuration=recorded, drift=drift)

    return app
