"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` for every failure.

Bad input is a 400 whose message names the field and says what to do; an unknown model is a
404 `model_not_found`; anything unexpected is a logged 500 in the same shape, so clients
(the `openai` package included) always get an error they can parse.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from agent.engine_api import EngineError
from agent.gateway.protocol import ErrorResponse

logger = logging.getLogger(__name__)

INVALID_REQUEST = "invalid_request_error"
SERVER_ERROR = "server_error"

# What each error status means on this server, for the OpenAPI document.
ERROR_MEANINGS = {
    400: "The request is invalid: the message names the field and says what to change.",
    401: "The admin API needs `Authorization: Bearer TOKEN` (the server's --admin-token).",
    403: "The admin API answers only on this host (the server has no --admin-token).",
    404: "What the request names does not exist: the message says what does.",
    409: "The deployment is not in a state that allows this: the message says why.",
    503: "The engine failed or is down; the same request may succeed when retried.",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """Returns FastAPI `responses=` declaring OpenAI-shaped errors with these statuses."""
    return {s: {"model": ErrorResponse, "description": ERROR_MEANINGS[s]} for s in statuses}


class APIError(Exception):
    """An error to answer in OpenAI's shape; raise it anywhere in a route."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code
        self.type = type or (INVALID_REQUEST if status < 500 else SERVER_ERROR)

    @classmethod
    def from_engine(cls, exc: EngineError) -> APIError:
        return cls(exc.message, status=exc.status, param=exc.param)

    def body(self) -> dict[str, Any]:
        """Returns the JSON body, also used for the final SSE event of a failed stream."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def _field_path(loc: tuple[Any, ...]) -> str:
    """Returns `messages[0].role` for pydantic's ("body", "messages", 0, "role")."""
    path = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def _describe(error: dict[str, Any]) -> tuple[str, str | None]:
    """Returns (message, param) for one pydantic error, phrased for an API user."""
    loc = tuple(error.get("loc", ()))
    kind = error.get("type", "")
    field = _field_path(loc)
    if kind == "json_invalid":
        reason = (error.get("ctx") or {}).get("error", "")
        at = f" at character {loc[1]}" if len(loc) > 1 else ""
        return f"The request body is not valid JSON ({reason}{at}): send a JSON object.", None
    if not field:  # the body as a whole
        if kind == "value_error":  # a validator of the whole body says what is wrong
            return str(error.get("msg", "")).removeprefix("Value error, "), None
        if kind == "missing":
            return "The request body is empty: send a JSON object.", None
        if isinstance(error.get("input"), bytes | str):
            return (
                "The request body must be a JSON object sent with Content-Type: application/json.",
                None,
            )
        return "The request body must be a JSON object.", None
    if kind == "missing":
        return f"{field} is required.", field
    msg = str(error.get("msg", "is invalid"))
    msg = msg.removeprefix("Value error, ")
    if kind == "value_error":  # our own validators phrase the sentence, often naming the field
        name = field.rsplit(".", 1)[-1].split("[")[0]  # "content" of "messages[0].content"
        if msg.startswith(name):
            return field + msg[len(name) :], field
        return f"{field}: {msg}", field
    got = error.get("input")
    shown = repr(got) if len(repr(got)) <= 60 else repr(got)[:57] + "..."
    return f"{field}: {msg} (got {shown}).", field


def _without_tags(loc: tuple[Any, ...], body: Any) -> tuple[Any, ...]:
    """Returns `loc` without the tags pydantic puts in it for a union chosen by its "type"
    (response_format's): ("body", "response_format", "json_schema", "json_schema", "schema")
    is the request's response_format.json_schema.schema.

    A part is such a tag where the object it would index has that "type"; the path is walked
    in the request `body` to see it.
    """
    kept: list[Any] = []
    value = body
    for i, part in enumerate(loc):
        if i == 0 and part == "body":
            kept.append(part)
            continue
        if isinstance(value, dict) and isinstance(part, str) and value.get("type") == part:
            value = {k: v for k, v in value.items() if k != "type"}  # the tag names this object
            continue
        kept.append(part)
        if isinstance(value, dict):
            value = value.get(part)
        elif isinstance(value, list) and isinstance(part, int) and 0 <= part < len(value):
            value = value[part]
        else:
            value = None
    return tuple(kept)


def validation_error_to_api_error(exc: RequestValidationError) -> APIError:
    """Folds pydantic's error list into one readable message naming the field(s)."""
    body = getattr(exc, "body", None)
    described = [
        _describe({**e, "loc": _without_tags(tuple(e.get("loc", ())), body)}) for e in exc.errors()
    ]
    if not described:
        return APIError("The request is invalid.")
    messages = list(dict.fromkeys(m for m, _ in described))  # dedupe, keep order
    return APIError(" ".join(messages[:3]), param=described[0][1])


def _answer(request: Request, error: APIError) -> JSONResponse:
    metrics = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.error_responses.labels(status=str(error.status)).inc()
    return error.response()


async def _on_api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return _answer(request, exc)


async def _on_engine_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, EngineError)
    return _answer(request, APIError.from_engine(exc))


async def _on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return _answer(request, validation_error_to_api_error(exc))


async def _on_http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    message = f"{exc.detail}: {request.method} {request.url.path}"
    if exc.status_code == 404:
        message += " (this server serves /v1/models, /v1/completions, /v1/chat/completions)"
    error = APIError(message, status=exc.status_code)
    headers = exc.headers
    if exc.status_code == 405:  # Starlette's Allow names the methods of one route of this path
        headers = {**(headers or {}), "Allow": ", ".join(sorted(_methods_at(request)))}
    return JSONResponse(error.body(), status_code=exc.status_code, headers=headers)


def _methods_at(request: Request) -> set[str]:
    """Returns the methods some route answers at the request's path."""
    routes = request.app.router.routes
    return {
        method
        for method in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
        if any(r.matches({**request.scope, "method": method})[0] == Match.FULL for r in routes)
    }


class CatchUnexpected:
    """ASGI middleware: an unexpected exception becomes one logged OpenAI-shaped 500.

    Starlette's own `Exception` handler re-raises after answering, which makes the server log
    the same traceback twice; this sits inside it and stops the exception here.
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_tracking(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_tracking)
        except ClientDisconnect:
            pass  # nobody to answer
        except Exception:
            logger.exception(
                "unexpected error serving %s %s", scope.get("method"), scope.get("path")
            )
            if not started:  # after the headers went out the server can only close the stream
                error = APIError("Internal server error; the gateway log has the details.", 500)
                await error.response()(scope, receive, send)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _on_api_error)
    app.add_exception_handler(EngineError, _on_engine_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_middleware(CatchUnexpected)
