"""The admin API of a serving process, beside the OpenAI one: see and change the deployment.

  GET  /admin/v1/deployment            configuration, epoch, devices, memory
  POST /admin/v1/applies               a target configuration; answers with the diff and an
                                       apply id (202), or only the diff with `dry_run`
  GET  /admin/v1/applies               every apply, oldest first
  GET  /admin/v1/applies/{id}          phases with start/end, bytes, predicted and measured figures
  GET  /admin/v1/applies/{id}/serving  TTFT/TPOT before, during and after it, and token times
  POST /admin/v1/applies/{id}/cancel   stop an apply (before its switch it aborts)
  GET  /admin/v1/workload              the workload monitor's window (also in the deployment)
  POST /admin/v1/devices/{name}/drain  move a device's layers elsewhere live, then mark it drained
  POST /admin/v1/devices               add a device: a drained one back, or a new worker (201)
  GET  /admin/v1/controller            the live controller's mode, policy and recent decisions

It answers clients on this host only, unless the server was given a token; then every admin
request must carry `Authorization: Bearer TOKEN`, from anywhere (the OpenAPI document declares
the bearer scheme then). Errors have the same shape as the OpenAI API's; a target that does not
fit this deployment (layers, devices) is a 400 `invalid_configuration`.
"""

from __future__ import annotations

import hmac
import re
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from agent.gateway.errors import APIError, error_responses
from agent.gateway.protocol import Integer, NonNegativeInt, PositiveInt
from agent.gateway.server import is_loopback
from agent.reconfigurations import ApplyRefused, Reconfigurations, deployment_json
from agent.token_log import WINDOW_S, serving_report
from planner.configuration import Configuration, ConfigurationError
from planner.spec import PipelineSpec, StageSpec

# Reads `Authorization: Bearer TOKEN` (None without one) and declares the scheme in the OpenAPI document.
_BEARER = HTTPBearer(auto_error=False, description="the server's --admin-token")


class StageBody(StageSpec):
    device: str | None = None  # None: the planner picks the worker that has to load least
    start: NonNegativeInt  # strict: "3" is a client bug to report, not to coerce
    end: PositiveInt


class PipelineBody(PipelineSpec):
    stages: list[StageBody] = Field(min_length=1)


class TargetBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    pipelines: list[PipelineBody] = Field(min_length=1)


# `stages`: the ranges a stage runs, as `--stages` takes them.
STAGES_PATTERN = r"^ *[0-9]+ *: *[0-9]+ *(, *[0-9]+ *: *[0-9]+ *)*$"


def _one_of_target_or_stages(schema: dict) -> None:
    """Documents `_one_target`: exactly one of them, and not null."""
    schema["oneOf"] = [
        {"required": [name], "properties": {name: {"not": {"type": "null"}}}}
        for name in ("target", "stages")
    ]


class ApplyBody(BaseModel):
    """A target: `target` (pipelines of stages, devices optional) or `stages` ("0:10,10:30")."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_one_of_target_or_stages)
    target: TargetBody | None = None
    stages: Annotated[str, Field(pattern=STAGES_PATTERN)] | None = Field(None, examples=["0:10,10:20,20:30"])
    dry_run: bool = Field(False, strict=True)
    max_overhead: float | None = Field(None, strict=True, gt=0, le=1,
                                       description="share of serving time background copies may take")
    expected_epoch: Integer | None = Field(None, description="refuse (409) unless the deployment is still at this epoch")
    kv: Literal["copy", "recompute"] = Field(
        "copy", description="copy running requests' KV to their new stages, or drop it and recompute it there"
    )
    recompute_overflow: bool = Field(False, strict=True, description=(
        "when memory cannot hold every running request's KV through the change, drop the KV of the "
        "requests cheapest to recompute (they wait at the head of the queue) instead of refusing the apply"))

    @model_validator(mode="after")
    def _one_target(self) -> ApplyBody:
        if (self.target is None) == (self.stages is None):
            raise ValueError("give exactly one of `target` (pipelines of stages) or `stages` (e.g. \"0:10,10:20,20:30\")")
        return self

    @field_validator("stages", mode="before")
    @classmethod
    def _stages_text(cls, stages: Any) -> Any:
        if isinstance(stages, str) and not re.fullmatch(STAGES_PATTERN, stages):
            raise ValueError(f'stages must be START:END layer ranges joined by commas, e.g. "0:10,10:20,20:30"; '
                             f"got {stages!r}")
        return stages

    def configuration(self) -> Configuration:
        if self.stages is not None:
            return Configuration.from_stages_text(self.stages)
        return Configuration.from_json(self.target.model_dump())


class AddDeviceBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    device: str | None = Field(None, min_length=1, description=(
        "a new name (worker-N) to start a worker under, or a drained device to re-admit; default: the first "
        "drained device, or else a new worker under the next free name"))
    kind: str | None = Field(None, min_length=1, description="the new device's kind: the server's own (cpu)")


def install_workload_monitor(app: FastAPI, reconfig: Reconfigurations) -> tuple[Any, Any]:
    """Feeds a workload monitor from the engine's requests and shows it on /metrics; adds the
    device fleet (drain / add). Returns (monitor, fleet); (None, None) for an engine without hooks."""
    from agent.device_fleet import DeviceFleet
    from agent.workload_monitor import WorkloadMonitor

    engine = getattr(reconfig, "engine", None)
    monitor = WorkloadMonitor()
    if engine is None or not monitor.attach(engine):
        monitor = None
    else:
        metrics = getattr(app.state, "metrics", None)
        if metrics is not None:
            metrics.watch_workload(monitor)
    fleet = DeviceFleet(reconfig) if engine is not None else None
    app.state.workload_monitor, app.state.device_fleet = monitor, fleet
    app.state.controller = None  # `pipeshift serve --controller` sets it
    return monitor, fleet


def install_admin_api(app: FastAPI, reconfig: Reconfigurations, token: str | None = None) -> None:
    """Adds the admin routes to `app`, guarded as the module docstring says."""
    monitor, fleet = install_workload_monitor(app, reconfig)

    def authorize_token(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)]) -> None:
        given = credentials.credentials if credentials else ""
        # As bytes: header values are latin-1 text, and compare_digest refuses non-ASCII str.
        if not hmac.compare_digest(given.encode("latin-1"), token.encode()):
            raise APIError("the admin API needs `Authorization: Bearer TOKEN` (the server's --admin-token)",
                           status=401, code="unauthorized")

    def authorize_host(request: Request) -> None:
        host = request.client.host if request.client else ""
        if not is_loopback(host):
            raise APIError("the admin API answers only on this host; start the server with --admin-token "
                           "to allow other hosts", status=403, code="forbidden")

    router = APIRouter(prefix="/admin/v1", dependencies=[Depends(authorize_token if token else authorize_host)],
                       tags=["admin"], responses=error_responses(401 if token else 403))

    def workload_json() -> dict[str, Any] | None:
        if monitor is None:
            return None
        figures = monitor.snapshot()
        serving = {str(p.pipeline_id): i for i, p in enumerate(reconfig.engine.serving_pipelines())}
        for pid, pipeline in figures["pipelines"].items():
            pipeline["serving_index"] = serving.get(pid)  # None: a pipeline an apply retired
        return figures

    @router.get("/deployment")
    async def deployment() -> JSONResponse:
        body = deployment_json(reconfig.engine, fleet)
        body["workload"] = workload_json()
        return JSONResponse(body)

    @router.get("/workload")
    async def workload() -> JSONResponse:
        """The workload monitor's sliding window: arrival rate, prompt and output lengths,
        queue length, KV use, SLO attainment and TTFT/TPOT per pipeline."""
        return JSONResponse({"workload": workload_json()})

    @router.get("/controller")
    async def controller(request: Request) -> JSONResponse:
        """The live controller's mode, policy and its most recent decisions (the last
        MAX_DECISIONS kept) with their reasons."""
        runner = getattr(request.app.state, "controller", None)
        if runner is None:
            return JSONResponse({"mode": "off", "running": False, "decisions": []})
        return JSONResponse(runner.to_json())

    def device_refused(exc: Exception) -> APIError:
        return APIError(exc.message, status=exc.status, code=exc.code)

    @router.post("/devices/{device}/drain", status_code=202, responses={
        200: {"description": "nothing to move: the device held no stage, or was drained already"},
        **error_responses(404, 409, 503)})
    async def drain_device(device: str) -> JSONResponse:
        """Plans the configuration without `device`, applies it live, then marks it drained."""
        from agent.device_fleet import DeviceRefused

        if fleet is None:
            raise APIError("this engine cannot drain devices", status=409, code="device_refused")
        try:
            record, message = fleet.drain(device)
        except DeviceRefused as exc:
            raise device_refused(exc) from None
        body = {"device": device, "state": fleet.state(device), "message": message,
                "apply": None if record is None else record.to_json()}
        if record is None:
            return JSONResponse(body, status_code=200)
        return JSONResponse(body, status_code=202, headers={"Location": f"/admin/v1/applies/{record.apply_id}"})

    @router.post("/devices", responses={
        201: {"description": "a new worker process was started: a spare holding no layers"},
        **error_responses(400, 409, 503)})
    def add_device(body: AddDeviceBody | None = None) -> JSONResponse:
        """Adds a device: a drained one is available to the planner and the controller again; a
        new name starts a worker process (a spare) and answers once it is up (201). A plain
        `def` (run on a worker thread): starting a worker takes seconds the streams must not wait."""
        from agent.device_fleet import DeviceRefused

        if fleet is None:
            raise APIError("this engine cannot add devices", status=409, code="device_refused")
        try:
            added, message, started = fleet.add(body.device if body is not None else None,
                                                body.kind if body is not None else None)
        except DeviceRefused as exc:
            raise device_refused(exc) from None
        devices = [d for d in deployment_json(reconfig.engine, fleet)["devices"] if d["name"] in added]
        return JSONResponse({"added": added, "started": started, "message": message, "devices": devices},
                            status_code=201 if started else 200)

    @router.post("/applies", status_code=202, responses={
        200: {"description": "`dry_run`: the plan, nothing applied"}, **error_responses(400, 409, 503)})
    async def create_apply(body: ApplyBody) -> JSONResponse:
        try:
            target = body.configuration()
            unavailable = fleet.unavailable() if fleet is not None else set()
            drained = unavailable & set(target.devices())
            if drained:
                raise ConfigurationError(f"{', '.join(sorted(drained))} is drained: add it back first "
                                         "(POST /admin/v1/devices, `pipeshift device add`)")
            # stages the target leaves without a device go to available ones only
            if body.dry_run:
                plan = reconfig.plan(target, body.max_overhead, body.recompute_overflow, exclude=unavailable)
                return JSONResponse({"plan": plan.to_json(), "text": plan.render(), "feasible": plan.feasible},
                                    status_code=200)
            record = reconfig.start(target, body.max_overhead, body.expected_epoch, body.kv,
                                    body.recompute_overflow, exclude=unavailable)
        except ConfigurationError as exc:
            raise APIError(str(exc), param="target" if body.target is not None else "stages",
                           code="invalid_configuration") from None
        except ApplyRefused as exc:
            error = APIError(exc.message, status=exc.status, code="apply_refused")
            content = error.body()
            if exc.plan is not None:
                content["plan"] = exc.plan.to_json()
                content["text"] = exc.plan.render()
            return JSONResponse(content, status_code=exc.status)
        return JSONResponse({"id": record.apply_id, "text": record.text, "apply": record.to_json()}, status_code=202,
                            headers={"Location": f"/admin/v1/applies/{record.apply_id}"})

    @router.get("/applies")
    async def list_applies() -> JSONResponse:
        return JSONResponse({"data": [r.to_json() for r in reconfig.history()]})

    @router.get("/applies/{apply_id}", responses=error_responses(404))
    async def get_apply(apply_id: str) -> JSONResponse:
        record = reconfig.get(apply_id)
        if record is None:
            raise APIError(f"no apply {apply_id!r}; GET /admin/v1/applies lists them", status=404, code="not_found")
        return JSONResponse(record.to_json())

    @router.get("/applies/{apply_id}/serving")
    async def apply_serving(apply_id: str, request: Request,
                            window_s: float = Query(WINDOW_S, gt=0, le=600)) -> JSONResponse:
        """TTFT/TPOT before, during and after the apply, and the token times of its streams."""
        record = reconfig.get(apply_id)
        if record is None:
            raise APIError(f"no apply {apply_id!r}; GET /admin/v1/applies lists them", status=404, code="not_found")
        log = request.app.state.metrics.token_log
        return JSONResponse(serving_report(log, record.created_at, record.finished_at, window_s))

    @router.post("/applies/{apply_id}/cancel", status_code=202, responses=error_responses(404))
    async def cancel_apply(apply_id: str) -> JSONResponse:
        record = reconfig.cancel(apply_id)
        if record is None:
            raise APIError(f"no apply {apply_id!r}; GET /admin/v1/applies lists them", status=404, code="not_found")
        return JSONResponse(record.to_json(), status_code=202)

    app.include_router(router)
