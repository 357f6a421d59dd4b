"""Request fields that constrain the output -> StructuredOutputsParams (or a 400 naming the field).

  response_format      {"type": "text"} | {"type": "json_object"} |
                       {"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}}
  structured_outputs   vLLM's extra field: {"json" | "regex" | "choice" | "grammar" | "json_object": ...,
                       "disable_any_whitespace": bool}
  guided_json, guided_regex, guided_choice, guided_grammar   vLLM's older extra fields, same meaning

At most one of them may be set. The spec is parsed here (no tokenizer, milliseconds), so a bad schema,
regex or grammar is a 400 before anything reaches the engine.
"""
from __future__ import annotations

from typing import Any

from jaxpaged.structured_output import StructuredOutputsParams

from .errors import invalid_request

GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


def _build(param: str, kwargs: dict) -> StructuredOutputsParams:
    try:
        spec = StructuredOutputsParams(**kwargs)
        spec.validate()
    except (ValueError, TypeError) as exc:
        raise invalid_request(f"{param}: {exc}", param=param) from None
    return spec


def from_response_format(fmt: Any) -> StructuredOutputsParams | None:
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise invalid_request("response_format must be an object", param="response_format")
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return _build("response_format", {"json_object": True})
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict):
            raise invalid_request("response_format.json_schema must be an object with a 'schema'",
                                  param="response_format")
        schema = spec.get("schema", {"type": "object"})   # OpenAI: schema is optional
        return _build("response_format", {"json": schema})
    raise invalid_request(f"response_format type must be 'text', 'json_object' or 'json_schema', got {kind!r}",
                          param="response_format")


def structured_outputs_of(req) -> StructuredOutputsParams | None:
    """The request's constraint from whichever field set it (at most one)."""
    extra = {k: getattr(req, k, None) for k in ("structured_outputs", *GUIDED)}
    given = []
    fmt = getattr(req, "response_format", None)
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        given.append("response_format")
    if extra.get("structured_outputs") is not None:
        given.append("structured_outputs")
    given += [k for k in GUIDED if extra.get(k) is not None]
    if len(given) > 1:
        raise invalid_request(f"only one of {', '.join(given)} may be set", param=given[1])
    if not given:
        return from_response_format(fmt)
    field = given[0]
    if field == "response_format":
        return from_response_format(fmt)
    if field == "structured_outputs":
        value = extra["structured_outputs"]
        if not isinstance(value, dict):
            raise invalid_request("structured_outputs must be an object", param="structured_outputs")
        allowed = {"json", "regex", "choice", "grammar", "json_object", "disable_any_whitespace"}
        unknown = sorted(set(value) - allowed)
        if unknown:
            raise invalid_request(f"structured_outputs: unsupported keys {unknown} (supported: {sorted(allowed)})",
                                  param="structured_outputs")
        return _build("structured_outputs", value)
    return _build(field, {GUIDED[field]: extra[field]})
