"""The admin API of a serving process, beside the OpenAI one: see and change the deployment.

  GET  /admin/v1/deployment            configuration, epoch, devices, memory
  POST /admin/v1/applies               a target configuration; answers with the diff and an
                                       apply id (202), or only the diff with `dry_run`
  GET  /admin/v1/applies               every apply, oldest first
  GET  /admin/v1/applies/{id}          phases with start/end, bytes, predicted and measured figures
  GET  /admin/v1/applies/{id}/serving  TTFT/TPOT before, during and after it, and token times
  POST /admin/v1/applies/{id}/cancel   stop an apply (before its switch it aborts)

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


def install_admin_api(app: FastAPI, reconfig: Reconfigurations, token: str | None = None) -> None:
    """Adds the admin routes to `app`, guarded as the module docstring says."""

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

    @router.get("/deployment")
    async def deployment() -> JSONResponse:
        return JSONResponse(deployment_json(reconfig.engine))

    @router.post("/applies", status_code=202, responses={
        200: {"description": "`dry_run`: the plan, nothing applied"}, **error_responses(400, 409, 503)})
    async def create_apply(body: ApplyBody) -> JSONResponse:
        try:
            target = body.configuration()
            if body.dry_run:
                plan = reconfig.plan(target, body.max_overhead)
                return JSONResponse({"plan": plan.to_json(), "text": plan.render(), "feasible": plan.feasible},
                                    status_code=200)
            record = reconfig.start(target, body.max_overhead, body.expected_epoch, body.kv)
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
