"""The OpenAI-compatible HTTP API in front of an `Engine`: `create_app(engine)`.

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (streamed as SSE
or whole), GET /health, GET /metrics.

An engine failure in the middle of a request (an event with finish_reason "error", or the
engine raising after its first event) ends a stream with `data: {"error": {...}}` and then
`data: [DONE]`; a non-streaming request answers 503 `engine_error` instead, because the
request itself was fine and may succeed when retried.

The OpenAPI document (/openapi.json) says what the server really does: every status it
answers, with the error shape, and request schemas holding the served model's limits.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel

from agent.engine_api import (
    PIPELINE_DOWN,
    Engine,
    EngineError,
    SamplingParams,
    TokenEvent,
    prompt_batch,
)
from agent.gateway.admission import (
    DEFAULT_COMPLETION_MAX_TOKENS,
    check_output_limit,
    resolve_model,
    response_grammar,
    sampling_params,
)
from agent.gateway.errors import ERROR_MEANINGS, APIError, error_responses, install_error_handlers
from agent.gateway.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    Health,
    ModelCard,
    ModelList,
    Usage,
    describe_model_limits,
)
from agent.gateway.responses import ChatFormat, ChoiceResult, CompletionFormat, ResponseFormat
from agent.gateway.stream import (
    SSE_DONE,
    ClientGone,
    EngineStream,
    EventStreamResponse,
    sse,
    until_disconnect,
)
from agent.metrics import GatewayMetrics

logger = logging.getLogger(__name__)


def generation_responses(chunk: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """Returns the answers of a generation route besides its JSON body: its `chunk`s streamed."""
    # OpenAPI 3.1: the `schema` of text/event-stream describes one event.
    event = {
        "type": "object",
        "required": ["data"],
        "properties": {
            "data": {
                "anyOf": [
                    {"const": "[DONE]"},
                    {
                        "type": "string",
                        "contentMediaType": "application/json",
                        "contentSchema": {"anyOf": [_ref(chunk), _ref(ErrorResponse)]},
                    },
                ]
            }
        },
    }
    return {
        200: {
            "description": "The whole answer; with `stream: true`, its chunks as server-sent "
            "events (`data: {...}`; a failure mid-stream as `data: {\"error\": {...}}`), then "
            "`data: [DONE]`.",
            "content": {"text/event-stream": {"schema": event}},
        },
        **error_responses(400, 404, 503),
    }


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def engine_failure(message: str | None) -> APIError:
    """Returns the error for an engine that failed mid-request (see the module docstring)."""
    reason = message or "no reason given"
    retry = "" if reason.startswith(PIPELINE_DOWN) else " Retry the request."  # it says when
    return APIError(
        f"The engine failed while generating: {reason}.{retry}",
        status=503,
        code="engine_error",
    )


def create_app(
    engine: Engine,
    aliases: Sequence[str] = (),
    admin_token: str | None = None,
    served_names: Sequence[str] = (),
) -> FastAPI:
    """Returns the gateway app for `engine`; `aliases` are other names clients may use beside
    the engine's own. `served_names`, when given, are instead the only names it answers to, the
    first in every response (vLLM's --served-model-name). An engine that reconfigures live
    also gets the admin API (agent/gateway/admin.py)."""
    app = FastAPI(title="pipeshift", summary="OpenAI-compatible API of a pipeshift deployment")
    generate_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            _make_true(generate_openapi(), engine)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    reconfig = getattr(engine, "reconfig", None)
    metrics = GatewayMetrics(stats=engine.stats, applies=reconfig)
    app.state.engine = engine
    app.state.metrics = metrics
    install_error_handlers(app)
    started = int(time.time())
    names = list(dict.fromkeys(served_names or [engine.model_name, *aliases]))  # once each
    primary, aliases = names[0], names[1:]

    def model_card(name: str) -> ModelCard:
        return ModelCard(id=name, created=started, max_model_len=engine.max_model_len)

    @app.get("/v1/models")
    async def list_models() -> ModelList:
        return ModelList(data=[model_card(n) for n in names])

    @app.get("/v1/models/{model_id:path}", responses=error_responses(404))
    async def get_model(model_id: str) -> ModelCard:
        return model_card(resolve_model(model_id, primary, aliases))

    @app.get(
        "/health",
        response_model=Health,
        responses={503: {"model": Health, "description": "The engine cannot serve: the reason."}},
    )
    async def health() -> JSONResponse:
        try:
            ok, reason = engine.health()
        except Exception as exc:  # a broken health check is itself a reason to take us out
            logger.exception("engine.health() failed")
            ok, reason = False, f"health check failed: {type(exc).__name__}: {exc}"
        epoch = {"epoch": engine.epoch} if isinstance(getattr(engine, "epoch", None), int) else {}
        if ok:
            return JSONResponse({"status": "ok", **epoch})
        return JSONResponse({"status": "unavailable", "reason": reason, **epoch}, status_code=503)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus_metrics() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.post(
        "/v1/completions",
        response_model=CompletionResponse,
        responses=generation_responses(CompletionResponse),
    )
    async def completions(body: CompletionRequest, request: Request) -> Response:
        arrival_s = time.perf_counter()
        model = _check_request(body, engine, primary, aliases)
        prompts = body.prompts()
        batch = [engine.encode_prompt(p) if isinstance(p, str) else list(p) for p in prompts]
        echo_only = body.echo and body.max_tokens == 0
        # Checked for the longest prompt, which has the least room (and for an empty one): one
        # max_tokens then fits every prompt.
        # A batch's refusal names the prompt it is about: the empty one, else the longest.
        worst = min(range(len(batch)), key=lambda i: (bool(batch[i]), -len(batch[i])))
        params = sampling_params(
            prompt_tokens=len(batch[worst]),
            max_context=engine.max_context,
            prompt_name="prompt" if len(batch) == 1 else f"prompt[{worst}]",
            # Echo alone still samples one token: its step computes the last prompt position.
            max_tokens=1 if echo_only else body.max_tokens,
            default_max_tokens=DEFAULT_COMPLETION_MAX_TOKENS,
            temperature=body.temperature,
            top_p=body.top_p,
            seed=body.seed,
            stop=body.stop_sequences(),
            ignore_eos=body.ignore_eos,
            prompt_param="prompt",
            **_shaping(body),
            logprobs=body.logprobs,
            n=body.n,
            prompt_logprobs=body.logprobs if body.echo else None,
            grammar=response_grammar(body.response_schema()),
        )
        request_id = f"cmpl-{uuid.uuid4().hex}"
        echo = [p if isinstance(p, str) else engine.decode(p) for p in prompts] if body.echo else None
        fmt = CompletionFormat(request_id, model, int(time.time()), body.include_usage(), n=body.n,
                               echo=echo, echo_only=echo_only, logprobs=body.logprobs is not None)
        return await _generate(
            request, engine, metrics, batch if len(batch) > 1 else batch[0], params, fmt, body.stream,
            arrival_s,
        )

    @app.post(
        "/v1/chat/completions",
        response_model=ChatCompletionResponse,
        responses=generation_responses(ChatCompletionChunk),
    )
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        arrival_s = time.perf_counter()
        model = _check_request(body, engine, primary, aliases)
        prompt_ids = engine.encode_chat([m.as_engine_message() for m in body.messages])
        params = sampling_params(
            prompt_tokens=len(prompt_ids),
            max_context=engine.max_context,
            max_tokens=body.output_limit(),
            default_max_tokens=None,
            temperature=body.temperature,
            top_p=body.top_p,
            seed=body.seed,
            stop=body.stop_sequences(),
            ignore_eos=body.ignore_eos,
            prompt_param="messages",
            prompt_name="the chat prompt (messages)",
            max_tokens_param=(
                "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
            ),
            **_shaping(body),
            logprobs=body.logprobs_wanted(),
            grammar=response_grammar(body.response_schema()),
            n=body.n,
        )
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        fmt = ChatFormat(request_id, model, int(time.time()), body.include_usage(), n=body.n,
                         logprobs=body.logprobs)
        return await _generate(
            request, engine, metrics, prompt_ids, params, fmt, body.stream, arrival_s
        )

    if reconfig is not None:
        from agent.gateway.admin import install_admin_api

        install_admin_api(app, reconfig, admin_token)
    return app


def _shaping(body: CompletionRequest | ChatCompletionRequest) -> dict[str, Any]:
    """Returns the logit bias and penalties of a request, as `sampling_params` takes them."""
    return {
        "top_k": body.top_k,
        "min_p": body.min_p,
        "logit_bias": body.logit_bias_pairs(),
        "presence_penalty": body.presence_penalty,
        "frequency_penalty": body.frequency_penalty,
        "repetition_penalty": body.repetition_penalty,
    }


def _make_true(schema: dict[str, Any], engine: Engine) -> None:
    """Turns FastAPI's OpenAPI `schema` into what this server answers, in place.

    Validation errors are 400s in OpenAI's shape (errors.py), never FastAPI's 422; a path
    parameter names something (a model, an apply) that may not exist: 404. Request bodies get
    the served model's limits.
    """
    error = {"$ref": "#/components/schemas/ErrorResponse"}
    for operations in schema["paths"].values():
        for operation in operations.values():
            responses = operation["responses"]
            parameters = operation.get("parameters", ())
            if responses.pop("422", None) is not None and (
                "requestBody" in operation or any(p.get("in") != "path" for p in parameters)
            ):
                responses.setdefault("400", {"description": ERROR_MEANINGS[400]})
            if any(p.get("in") == "path" for p in parameters):
                responses.setdefault("404", {"description": ERROR_MEANINGS[404]})
            for status in ("400", "404"):
                if status in responses:
                    responses[status]["content"] = {"application/json": {"schema": error}}
    components = schema["components"]["schemas"]
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    # FastAPI's document turns bounds into floats, which cannot hold the seed's int64 ones.
    _add_schemas(components, CompletionRequest, ChatCompletionRequest, mode="validation")
    # Named only inside event streams, so FastAPI did not add it.
    _add_schemas(components, ChatCompletionChunk, mode="serialization")
    arch = getattr(engine, "arch", None)  # PipelineEngine's model architecture, if there is one
    describe_model_limits(schema, engine.max_context, getattr(arch, "vocab_size", None))


def _add_schemas(
    components: dict[str, Any], *models: type[BaseModel], mode: Literal["validation", "serialization"]
) -> None:
    """Puts pydantic's own JSON Schema of `models`, and of the models they use, in `components`."""
    for model in models:
        own = model.model_json_schema(ref_template="#/components/schemas/{model}", mode=mode)
        components.update(own.pop("$defs", {}))
        components[model.__name__] = own


def _check_request(
    body: CompletionRequest | ChatCompletionRequest,
    engine: Engine,
    primary: str,
    aliases: Sequence[str],
) -> str:
    """Returns the model name to answer with; raises for unknown models and unsupported fields."""
    model = resolve_model(body.model, primary, aliases)
    problems = body.unsupported_fields()
    if problems:
        # Each problem is a sentence of its own, so that several read apart.
        message = " ".join(m if m.endswith(".") else m + "." for _, m in problems)
        raise APIError(message, param=problems[0][0])
    for param in ("max_tokens", "max_completion_tokens"):
        check_output_limit(getattr(body, param, None), engine.max_context, param)
    return model


async def _generate(
    request: Request,
    engine: Engine,
    metrics: GatewayMetrics,
    prompt_ids: list[int] | list[list[int]],
    params: SamplingParams,
    fmt: ResponseFormat,
    streaming: bool,
    arrival_s: float,
) -> Response:
    """Runs one admitted request (one prompt or a batch, n choices each) on the engine and
    answers it, streamed or whole."""
    batch = prompt_batch(prompt_ids)
    prompt_tokens = sum(len(p) for p in batch)
    try:
        # An engine may refuse here (a plain function) or at the first event (a generator).
        events = engine.generate(fmt.request_id, prompt_ids, params)
    except EngineError as exc:
        raise APIError.from_engine(exc) from exc
    timer = metrics.start_request(arrival_s)
    timer.prompt(prompt_tokens)
    stream = EngineStream(events, timer, prompt_tokens, choices=len(batch) * params.n)
    # The first event is awaited before answering so that a refusal gets its own status.
    try:
        first = await until_disconnect(request, stream.next())
    except EngineError as exc:
        await stream.close(refused=True)
        raise APIError.from_engine(exc) from exc
    except ClientGone:
        await stream.close()
        return Response(status_code=499)  # nobody reads it; 499 is nginx's "client closed"
    except BaseException:
        await stream.close()
        raise
    headers = {"X-Request-Id": fmt.request_id}
    if streaming:
        body = _sse_body(request, stream, first, fmt)
        headers |= {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return EventStreamResponse(body, on_close=stream.close, headers=headers)
    try:
        results, last = await until_disconnect(request, _collect(stream, first))
    except ClientGone:
        return Response(status_code=499)
    finally:
        await stream.close()
    if last.finish_reason == "error":
        raise engine_failure(last.error)
    usage = Usage.of(stream.prompt_tokens, stream.completion_tokens)
    whole = fmt.whole(results, usage)
    return JSONResponse(whole.model_dump(mode="json"), headers=headers)


async def _collect(stream: EngineStream, first: TokenEvent) -> tuple[list[ChoiceResult], TokenEvent]:
    """Returns each choice's text, logprobs and finish reason, in choice order, and the last
    event (an error ends the request)."""
    results: dict[int, ChoiceResult] = {}
    parts: dict[int, list[str]] = {}
    event = first
    while True:
        result = results.setdefault(event.index, ChoiceResult(event.index))
        parts.setdefault(event.index, []).append(event.text)
        result.logprobs.extend(event.logprobs or [])
        result.prompt_logprobs.extend(event.prompt_logprobs or [])
        if event.finish_reason is not None:
            result.finish_reason = event.finish_reason
        if stream.finish_reason is not None:
            break
        event = await stream.next()
    for index, result in results.items():
        result.text = "".join(parts[index])
    return [results[i] for i in sorted(results)], event


async def _sse_body(
    request: Request, stream: EngineStream, first: TokenEvent, fmt: ResponseFormat
) -> AsyncIterator[bytes]:
    """Yields the SSE chunks of one request; closing it early aborts the engine request."""
    try:
        for chunk in fmt.opening():
            yield chunk
        event = first
        while True:
            chunk = fmt.text(event.index, event.text, event.logprobs, event.prompt_logprobs)
            if chunk is not None:
                yield chunk
            if event.finish_reason not in (None, "error"):
                yield fmt.finish(event.index, event.finish_reason)
            if stream.finish_reason is not None:
                break
            # Between events: a client that left must not keep a KV slot busy.
            if await request.is_disconnected():
                return
            event = await stream.next()
        if stream.finish_reason == "error":
            yield sse(engine_failure(event.error).body())
        elif fmt.include_usage:
            yield fmt.usage(Usage.of(stream.prompt_tokens, stream.completion_tokens))
        yield SSE_DONE
    except Exception:  # headers are gone; the stream itself must carry the error
        logger.exception("streaming %s failed", fmt.request_id)
        yield sse(APIError("Internal server error while streaming.", 500).body())
        yield SSE_DONE
    finally:
        await stream.close()
