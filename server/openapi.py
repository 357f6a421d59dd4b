"""What /openapi.json says: the request bodies, answers and error bodies the routes really produce.

FastAPI's own document promises a 422 `HTTPValidationError` for invalid bodies; this server answers
400 with OpenAI's error body instead (and 401 / 404 / 429 / 503 in the same shape), so the
document is patched once, when first asked for:

- every operation lists the error statuses it can answer (`ERRORS`; 413 beyond --payload-limit), each with
  `ErrorResponse`;
  the 422 entries and their components are removed;
- /tokenize (whose handler picks its model by the presence of `messages`) documents its body as
  one of `TokenizeCompletionRequest` / `TokenizeChatRequest`;
- /health answers 200 with an empty body (no content type), 503 with an error body; /metrics with
  Prometheus text;
- with an API key, /v1/* operations carry a bearer security requirement;
- the request schemas state the value ranges the server enforces (temperature >= 0, 0 < top_p <= 1,
  n <= max_num_seqs, token ids below the vocabulary size, ...), and the int64 bounds exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict
from pydantic.json_schema import models_json_schema

from .protocol import (INT64_MAX, INT64_MIN, ChatCompletionResponse, CompletionResponse, DetokenizeResponse, ModelList,
                       TokenizeChatRequest, TokenizeCompletionRequest, TokenizeResponse)

_REF = "#/components/schemas/{model}"

_ERROR_TEXT = {
    400: "invalid request: the body is not JSON, nests too deep, or a field is wrong (`param` names it)",
    401: "missing or wrong API key (`code: invalid_api_key`)",
    404: "unknown model (`code: model_not_found`)",
    413: "the body is larger than --payload-limit (`code: payload_too_large`)",
    429: "the waiting queue is full (`code: rate_limit_exceeded`); retry after `Retry-After` seconds",
    500: "the engine step failed; the request was aborted and the server keeps serving",
    503: "the engine (or a data-parallel replica: the message names it) has stopped, or the server is shutting down",
}

# (method, path) -> the error statuses the route can answer (401 is added under an API key for /v1/*)
ERRORS = {
    ("post", "/v1/completions"): (400, 404, 413, 429, 500, 503),
    ("post", "/v1/chat/completions"): (400, 404, 413, 429, 500, 503),
    ("post", "/tokenize"): (400, 404, 413),
    ("post", "/detokenize"): (400, 404, 413),
    ("get", "/v1/models"): (),
    ("get", "/version"): (),
    ("get", "/health"): (),
    ("get", "/metrics"): (),
}


# (method, path) -> (the model of a 200 JSON body, whether "stream": true answers text/event-stream instead)
OK_BODIES = {
    ("post", "/v1/completions"): (CompletionResponse, True),
    ("post", "/v1/chat/completions"): (ChatCompletionResponse, True),
    ("post", "/tokenize"): (TokenizeResponse, False),
    ("post", "/detokenize"): (DetokenizeResponse, False),
    ("get", "/v1/models"): (ModelList, False),
}
_VERSION = {"type": "object", "properties": {"version": {"type": "string"}}, "required": ["version"]}


@dataclass(frozen=True)
class SchemaBounds:
    """The engine's bounds that the request schemas state (the server refuses values past them with a 400)."""
    vocab_size: int
    max_model_len: int
    max_num_seqs: int
    max_logprobs: int
    max_client_batch_size: int


def install_openapi(app, *, api_key: bool, bounds: SchemaBounds | None = None) -> None:
    """Makes app.openapi() return the patched document (built once)."""
    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = patch_openapi(generate(), api_key=api_key, bounds=bounds)
        return app.openapi_schema

    app.openapi = openapi


class ErrorInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """OpenAI's error body."""
    model_config = ConfigDict(extra="forbid")
    error: ErrorInfo


def patch_openapi(schema: dict, *, api_key: bool, bounds: SchemaBounds | None = None) -> dict:
    """Rewrites FastAPI's generated document in place (see the module docstring) and returns it."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    _walk(components, _exact_int64_bounds)
    if bounds is not None:
        _state_ranges(components, bounds)
    _add_models(components, [ErrorResponse, TokenizeCompletionRequest, TokenizeChatRequest], "validation")
    _add_models(components, [model for model, _ in OK_BODIES.values()], "serialization")
    for path, ops in schema.get("paths", {}).items():
        for method, op in ops.items():
            responses = op.setdefault("responses", {})
            responses.pop("422", None)
            _document_ok(responses, method, path)
            statuses = list(ERRORS.get((method, path), (400,)))
            if api_key and path.startswith("/v1"):
                statuses.append(401)
                op["security"] = [{"bearer": []}]
            for status in sorted(statuses):
                responses[str(status)] = _error_response(status)
    _patch_tokenize(schema)
    _patch_plain_routes(schema)
    for unused in ("HTTPValidationError", "ValidationError"):
        components.pop(unused, None)
    if api_key:
        schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    return schema


def _add_models(components: dict, models: list[type[BaseModel]], mode: str) -> None:
    _, defs = models_json_schema([(m, mode) for m in models], ref_template=_REF)
    for name, definition in defs.get("$defs", {}).items():
        components.setdefault(name, definition)


def _document_ok(responses: dict, method: str, path: str) -> None:
    if (method, path) == ("get", "/version"):
        responses["200"] = {"description": "the server's version",
                            "content": {"application/json": {"schema": _VERSION}}}
    if (method, path) not in OK_BODIES:
        return
    model, streams = OK_BODIES[(method, path)]
    content = {"application/json": {"schema": {"$ref": _REF.format(model=model.__name__)}}}
    description = "the answer"
    if streams:
        content["text/event-stream"] = {"schema": {"type": "string"}}
        description = ('the answer; with "stream": true, Server-Sent Events instead: `data: {chunk}` blocks, '
                       "then `data: [DONE]`")
    responses["200"] = {"description": description, "content": content}


def _error_response(status: int) -> dict:
    response = {"description": _ERROR_TEXT.get(status, "error"),
                "content": {"application/json": {"schema": {"$ref": _REF.format(model="ErrorResponse")}}}}
    if status == 429:
        response["headers"] = {"Retry-After": {"description": "seconds to wait before retrying", "required": True,
                                               "schema": {"type": "integer"}}}
    return response


def _patch_tokenize(schema: dict) -> None:
    op = schema.get("paths", {}).get("/tokenize", {}).get("post")
    if op is None:
        return
    one_of = [{"$ref": _REF.format(model=m.__name__)} for m in (TokenizeCompletionRequest, TokenizeChatRequest)]
    op["requestBody"] = {"required": True, "content": {"application/json": {"schema": {"oneOf": one_of}}},
                         "description": "a body with `messages` tokenizes a chat, otherwise `prompt` is tokenized"}


def _patch_plain_routes(schema: dict) -> None:
    paths = schema.get("paths", {})
    health = paths.get("/health", {}).get("get")
    if health is not None:
        health["responses"] = {"200": {"description": "the engine is running (empty body)"},
                               "503": _error_response(503)}
    metrics = paths.get("/metrics", {}).get("get")
    if metrics is not None:
        metrics["responses"]["200"] = {"description": "Prometheus text exposition format",
                                       "content": {"text/plain": {"schema": {"type": "string"}}}}


def _walk(node, fn) -> None:
    """Calls fn on every dict inside a JSON schema (depth first)."""
    if isinstance(node, dict):
        fn(node)
        for value in node.values():
            _walk(value, fn)
    elif isinstance(node, list):
        for value in node:
            _walk(value, fn)


def _exact_int64_bounds(node: dict) -> None:
    # the generator writes the int64 bounds as floats (9.223372036854776e18 is 2**63, one past the largest)
    if node.get("type") == "integer" and isinstance(node.get("maximum"), float) and node["maximum"] >= INT64_MAX:
        node["maximum"], node["minimum"] = INT64_MAX, INT64_MIN


def _ranges(bounds: SchemaBounds) -> dict[str, dict]:
    """Field -> the bounds SamplingParams and the handlers enforce (each one answered 400 past it)."""
    tokens = {"minimum": 1, "maximum": bounds.max_model_len}
    return {
        "temperature": {"minimum": 0}, "top_p": {"exclusiveMinimum": 0, "maximum": 1}, "top_k": {"minimum": -1},
        "min_p": {"minimum": 0, "maximum": 1}, "presence_penalty": {"minimum": -2, "maximum": 2},
        "frequency_penalty": {"minimum": -2, "maximum": 2}, "repetition_penalty": {"exclusiveMinimum": 0},
        "n": {"minimum": 1, "maximum": bounds.max_num_seqs}, "best_of": {"minimum": 1}, "min_tokens": {"minimum": 0},
        "max_tokens": tokens, "max_completion_tokens": tokens,
        "logprobs": {"minimum": 0, "maximum": bounds.max_logprobs},
        "top_logprobs": {"minimum": 0, "maximum": bounds.max_logprobs},
    }


def _state_ranges(components: dict, bounds: SchemaBounds) -> None:
    """Writes the value ranges into the request schemas: numbers on the non-null branch, token ids below the
    vocabulary size, non-empty prompt and message lists, at most max_client_batch_size prompts."""
    token_id = {"minimum": 0, "maximum": bounds.vocab_size - 1}
    ranges = _ranges(bounds)
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        props = components.get(name, {}).get("properties", {})
        for field, field_range in ranges.items():
            for branch in _branches(props.get(field)):
                if branch.get("type") in ("integer", "number"):
                    branch.update(field_range)
        for branch in _branches(props.get("stop_token_ids")):
            if branch.get("type") == "array":
                branch["items"].update(token_id)
    prompt = components.get("CompletionRequest", {}).get("properties", {}).get("prompt")
    for branch in _branches(prompt):
        if branch.get("type") == "array":
            branch["minItems"] = 1
            items = branch["items"]
            if items.get("type") != "integer":        # a list of prompts (one token-id list is one prompt)
                branch["maxItems"] = bounds.max_client_batch_size
            if items.get("type") == "array":
                items["minItems"] = 1
                items = items["items"]
            if items.get("type") == "integer":
                items.update(token_id)
    for name in ("ChatCompletionRequest", "TokenizeChatRequest"):
        messages = components.get(name, {}).get("properties", {}).get("messages")
        if messages is not None:
            messages["minItems"] = 1
    tokens = components.get("DetokenizeRequest", {}).get("properties", {}).get("tokens")
    if tokens is not None:
        tokens["items"].update(token_id)


def _branches(prop: dict | None) -> list[dict]:
    if prop is None:
        return []
    return list(prop.get("anyOf", [prop]))
