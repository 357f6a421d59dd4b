"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` and the exception that carries one."""
from __future__ import annotations

import re
from http import HTTPStatus

from fastapi.responses import JSONResponse

# The engine's ValueError messages start with the field name ("temperature must be >= 0, got -1",
# "max_model_len: must be >= 1").
_FIELD_PREFIX = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)(\s*:)?")


class OpenAIError(Exception):
    """An error to return to the client with an HTTP status (400 unless told otherwise)."""

    def __init__(self, message: str, *, status: int = 400, type: str | None = None,
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type or _default_type(status)
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type,
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _default_type(status: int) -> str:
    if status == 401:
        return "invalid_request_error"
    if status == 404:
        return "invalid_request_error"
    if 400 <= status < 500:
        return "invalid_request_error"
    return "internal_server_error"


def invalid_request(message: str, param: str | None = None) -> OpenAIError:
    return OpenAIError(message, status=400, param=param)


def from_value_error(exc: Exception, known_params: dict[str, str] | set[str] | None = None) -> OpenAIError:
    """Maps an engine/SamplingParams ValueError ("field must be ...") to a 400 naming `param`.

    The leading word counts as the field when it is in `known_params` (a dict renames it to the
    request's own field name, e.g. SamplingParams' logprobs -> chat's top_logprobs); without
    `known_params`, only a leading "word:" does.
    """
    message = str(exc) or exc.__class__.__name__
    param = None
    m = _FIELD_PREFIX.match(message)
    if m:
        word = m.group(1)
        if known_params is not None and word in known_params:
            param = known_params[word] if isinstance(known_params, dict) else word
        elif known_params is None and m.group(2):
            param = word
    return OpenAIError(message, status=400, param=param)


def not_found_model(model: str) -> OpenAIError:
    return OpenAIError(f"The model `{model}` does not exist.", status=404, param="model",
                       code="model_not_found")


def unauthorized(message: str = "Incorrect API key provided.") -> OpenAIError:
    return OpenAIError(message, status=401, code="invalid_api_key")


def payload_too_large(size: int, limit: int) -> OpenAIError:
    return OpenAIError(f"the request body is {size} bytes or more; at most {limit} are allowed (--payload-limit)",
                       status=413, code="payload_too_large")


def too_many_requests(message: str, retry_after_s: int) -> OpenAIError:
    """429 with Retry-After (OpenAI's body for rate limits: code rate_limit_exceeded)."""
    return OpenAIError(message, status=429, type="rate_limit_exceeded", code="rate_limit_exceeded",
                       headers={"Retry-After": str(retry_after_s)})


def internal_error(message: str) -> OpenAIError:
    return OpenAIError(message, status=500, type="internal_server_error")


def status_phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def pydantic_errors_to_openai(errors: list[dict]) -> OpenAIError:
    """Turns a RequestValidationError's list into one 400 naming the first offending field."""
    if not errors:
        return invalid_request("Invalid request body.")
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body",)]
    # drop pydantic's union-member tags ("str", "list[int]", "function-after[...]") from the path
    path = [p for p in loc if not _looks_like_type_tag(p)]
    param = ".".join(path) if path else None
    msg = first.get("msg", "invalid value")
    where = f" at '{param}'" if param else ""
    extra = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return invalid_request(f"Invalid request{where}: {msg}{extra}", param=param)


def _looks_like_type_tag(part: str) -> bool:
    return any(ch in part for ch in "[]()-") or part in (
        "str", "int", "float", "bool", "list", "dict", "none", "is-instance", "literal")
