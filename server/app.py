"""The FastAPI app: routes, API-key check, OpenAI-shaped error handlers, engine thread lifecycle.

`build_app(engine, served_model_name, api_key)` takes an AsyncLLMEngine or any object with the
Engine contract (docs/CONTRACTS.md), which it wraps. The engine thread starts with the app's
lifespan (or on the first request when the ASGI host runs no lifespan) and stops at shutdown.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

import jaxpaged
from jaxpaged.inputs import check_token_ids

from .async_engine import AsyncLLMEngine, EngineDeadError, EngineQueueFullError, EngineStepError
from .body_guard import BodyGuardMiddleware
from .errors import (OpenAIError, from_value_error, internal_error, invalid_request, pydantic_errors_to_openai,
                     too_many_requests, unauthorized)
from .limits import RETRY_AFTER_S, ServerLimits
from .lora import install_lora_routes, make_lora_serving, runtime_updating_allowed
from .metrics import CONTENT_TYPE_LATEST, ServerMetrics
from .openapi import SchemaBounds, install_openapi
from .protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, DetokenizeResponse, ModelCard,
                       ModelList, TokenizeChatRequest, TokenizeCompletionRequest, TokenizeResponse)
from .serving import ServingContext
from .serving_chat import create_chat_completion
from .serving_completion import create_completion

logger = logging.getLogger("jaxpaged.server")


def build_app(engine, served_model_name: str | list[str] | None = None, api_key: str | None = None,
              *, docs: bool = True, limits: ServerLimits | None = None, tool_call_parser: str | None = None,
              enable_auto_tool_choice: bool = False, lora_modules: list | None = None,
              allow_runtime_lora_updating: bool = False) -> FastAPI:
    limits = limits or ServerLimits()
    # an AsyncLLMEngine, or something shaped like one (data_parallel.DataParallelEngine), is used as is
    is_async = isinstance(engine, AsyncLLMEngine) or getattr(engine, "is_async_engine", False)
    async_engine = engine if is_async else AsyncLLMEngine(engine)
    async_engine.max_queued_requests = limits.max_queued_requests
    names = _model_names(served_model_name, async_engine)
    if async_engine.metrics is None:
        async_engine.metrics = ServerMetrics(names[0])
    ctx = ServingContext(async_engine, names, async_engine.metrics, limits)
    ctx.tool_call_parser, ctx.enable_auto_tool_choice = tool_call_parser, enable_auto_tool_choice
    ctx.lora = make_lora_serving(async_engine, names, lora_modules or [])

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        async_engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(async_engine.stop)
            logger.info("engine thread stopped")

    no_docs = {} if docs else dict(docs_url=None, redoc_url=None, openapi_url=None)
    app = FastAPI(title="jaxpaged OpenAI-compatible server", version=jaxpaged.__version__, lifespan=lifespan,
                  **no_docs)
    install_openapi(app, api_key=bool(api_key),
                    bounds=SchemaBounds(vocab_size=ctx.vocab_size, max_model_len=ctx.max_model_len,
                                        max_num_seqs=ctx.max_num_seqs, max_logprobs=ctx.max_logprobs,
                                        max_client_batch_size=limits.max_client_batch_size))
    app.state.ctx = ctx
    app.state.async_engine = async_engine
    _install_error_handlers(app)
    app.add_middleware(_InternalErrorMiddleware)
    app.add_middleware(BodyGuardMiddleware, payload_limit=limits.payload_limit, on_reject=_log_rejection)
    if api_key:
        app.add_middleware(_ApiKeyMiddleware, api_key=api_key)
    if ctx.lora is not None and runtime_updating_allowed(allow_runtime_lora_updating):
        install_lora_routes(app, ctx.lora)

    def ensure_started():
        if not async_engine.is_running:
            if async_engine.dead_error is not None:
                raise OpenAIError("the engine has stopped", status=503, type="service_unavailable")
            async_engine.start()

    @app.get("/health")
    async def health() -> Response:
        check = getattr(async_engine, "check_health", None)
        if check is not None:   # data-parallel replicas: 503 naming the dead ones
            dead = await check()
            if dead:
                return OpenAIError("; ".join(f"replica {i} is dead: {err}" for i, err in dead), status=503,
                                   type="service_unavailable").response()
            return Response(status_code=200)
        if async_engine.dead_error is not None:
            return OpenAIError(f"the engine has stopped: {async_engine.dead_error!r}", status=503,
                               type="service_unavailable").response()
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> dict:
        return {"version": jaxpaged.__version__}

    @app.get("/v1/models")
    async def models() -> dict:
        cards = [ModelCard(id=name, root=ctx.model_path, max_model_len=ctx.max_model_len) for name in names]
        cards += ctx.lora.cards(ctx.max_model_len) if ctx.lora is not None else []
        return ModelList(data=cards).model_dump(mode="json")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, raw: Request) -> Response:
        ensure_started()
        _check_batch_size(body.prompt, limits.max_client_batch_size)
        return await create_completion(ctx, body, raw)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, raw: Request) -> Response:
        ensure_started()
        return await create_chat_completion(ctx, body, raw)

    @app.post("/tokenize")
    async def tokenize(raw: Request) -> dict:
        data = await _json_object(raw)
        try:
            if "messages" in data:
                req = TokenizeChatRequest.model_validate(data)
            else:
                req = TokenizeCompletionRequest.model_validate(data)
        except ValidationError as exc:
            raise pydantic_errors_to_openai(exc.errors()) from None
        ctx.check_model(req.model)
        if isinstance(req, TokenizeChatRequest):
            text = ctx.apply_chat_template(req.messages, add_generation_prompt=req.add_generation_prompt,
                                           continue_final_message=req.continue_final_message,
                                           extra=req.chat_template_kwargs)
        else:
            text = req.prompt
        ids = ctx.encode(text, add_special_tokens=req.add_special_tokens)
        strs = ctx.tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=ctx.max_model_len, tokens=ids,
                                token_strs=strs).model_dump(mode="json")

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict:
        ctx.check_model(body.model)
        try:
            check_token_ids(body.tokens, ctx.vocab_size, "tokens")
        except ValueError as exc:
            raise from_value_error(exc, {"tokens"}) from None
        return DetokenizeResponse(prompt=ctx.tokenizer.decode(body.tokens)).model_dump(mode="json")

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(ctx.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


def _check_batch_size(prompt, cap: int) -> None:
    """A list of prompts (strings or token-id lists) may hold at most `cap` of them."""
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) and len(prompt) > cap:
        raise invalid_request(f"prompt holds {len(prompt)} prompts; at most {cap} are allowed in one request "
                              f"(--max-client-batch-size)", param="prompt")


def _model_names(served_model_name, async_engine: AsyncLLMEngine) -> list[str]:
    if isinstance(served_model_name, str):
        return [served_model_name]
    if served_model_name:
        return list(served_model_name)
    return [str(async_engine.engine.config.model)]


async def _json_object(raw: Request) -> dict:
    try:
        data = json.loads(await raw.body())
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise invalid_request("the request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise invalid_request("the request body must be a JSON object")
    return data


def _one_line(text: str) -> str:
    """Messages may quote the client's text or a parser's multi-line report: newlines are escaped."""
    return text.replace("\r", "\\r").replace("\n", "\\n")


def _log_rejection(scope, err: OpenAIError) -> None:
    """One log line per refused request (no traceback: the request was at fault, not the server)."""
    message = _one_line(err.message)
    message = message if len(message) <= 300 else message[:300] + "..."
    param = f" (param {_one_line(err.param)})" if err.param else ""
    level = logging.INFO if err.status < 500 else logging.WARNING
    logger.log(level, "%s %s -> %d: %s%s", scope.get("method", "-"), scope.get("path", "-"), err.status,
               message, param)


def _body_shape_error(request: Request) -> OpenAIError:
    """A body that is not a JSON object: say whether the content type or the JSON is wrong."""
    ctype = request.headers.get("content-type", "")
    if "json" not in ctype.lower():
        got = f"'{ctype}'" if ctype else "none"
        return invalid_request(f"the request body must be a JSON object sent with 'Content-Type: application/json' "
                               f"(Content-Type: {got})")
    return invalid_request("the request body must be a JSON object")


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
        _log_rejection(request.scope, exc)
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        if errors and errors[0].get("type") == "json_invalid":
            err = invalid_request("the request body is not valid JSON")
        elif errors and tuple(errors[0].get("loc", ())) == ("body",):   # the body as a whole, not a field
            err = _body_shape_error(request)
        else:
            err = pydantic_errors_to_openai(errors)
        _log_rejection(request.scope, err)
        return err.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        err = OpenAIError(str(exc.detail), status=exc.status_code,
                          code="not_found" if exc.status_code == 404 else None)
        _log_rejection(request.scope, err)
        return JSONResponse(err.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(EngineDeadError)
    async def engine_dead(_: Request, exc: EngineDeadError) -> JSONResponse:
        return OpenAIError(str(exc), status=503, type="service_unavailable").response()

    @app.exception_handler(EngineQueueFullError)
    async def queue_full(request: Request, exc: EngineQueueFullError) -> JSONResponse:
        err = too_many_requests(str(exc), RETRY_AFTER_S)
        _log_rejection(request.scope, err)
        return err.response()

    @app.exception_handler(EngineStepError)
    async def engine_step_failed(_: Request, exc: EngineStepError) -> JSONResponse:
        return internal_error(str(exc)).response()



class _InternalErrorMiddleware:
    """Pure ASGI, innermost of the user middlewares: an exception no handler took becomes a 500 with
    OpenAI's body and ONE traceback in the log (an `Exception` handler would leave Starlette to re-raise
    it after answering, and the ASGI server would log the traceback a second time)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:  # noqa: BLE001 - answered here, logged once
            logger.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            if not started:
                await internal_error(f"internal error: {exc.__class__.__name__}: {exc}").response()(
                    scope, receive, send)


class _ApiKeyMiddleware:
    """Pure ASGI (so streaming and disconnect detection pass through untouched): /v1/* needs the Bearer key."""

    def __init__(self, app, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1") and scope["method"] != "OPTIONS":
            given = dict(scope.get("headers") or ()).get(b"authorization", b"")
            if not secrets.compare_digest(given, self.expected):
                err = unauthorized()
                _log_rejection(scope, err)
                await err.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)
