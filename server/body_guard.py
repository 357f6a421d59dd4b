"""A guard in front of every JSON endpoint: bodies no handler can work with are refused before anything parses them.

- Larger than the operator's --payload-limit (TGI's name): 413, read no further.

- Nesting deeper than MAX_JSON_DEPTH: Python's json module and pydantic recurse once per level, so a
  body like `[[[[...]]]]` 1000 levels deep would end in a RecursionError (a 500 and a traceback)
  somewhere. No request of the OpenAI API needs more than a handful of levels (a tool's JSON schema
  perhaps 10-20), so the limit is generous and fixed. The check scans the raw bytes once: string
  literals are cut out (brackets inside strings do not nest), then the running depth of `[`/`{`
  minus `]`/`}` is tracked. On valid JSON that is the exact nesting depth; on invalid JSON the
  parser that runs next answers 400 anyway.
- Unpaired UTF-16 surrogates: JSON may write `"\\ud800"`, which parses to a Python str that no
  tokenizer, template or UTF-8 response can hold. Only bodies with such an escape are parsed here
  (to find the string and name its field); the rest pass untouched.
"""
from __future__ import annotations

import json
import re

import numpy as np

from .errors import OpenAIError, invalid_request, payload_too_large

MAX_JSON_DEPTH = 64

# A JSON string literal: quote, runs of plain characters and backslash escapes, quote (unrolled, so fast).
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_BODY_METHODS = {"POST", "PUT", "PATCH"}
# a \uD800-\uDFFF escape (the exact test for an unpaired one runs on the parsed strings)
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def json_depth(body: bytes) -> int:
    """The deepest nesting of arrays/objects in `body` (exact for valid JSON)."""
    if body.count(b"[") + body.count(b"{") == 0:
        return 0
    bare = _STRING.sub(b"", body)
    # clearing bit 5 maps "{" (0x7B) onto "[" (0x5B) and "}" (0x7D) onto "]" (0x5D)
    folded = np.frombuffer(bare, dtype=np.uint8) & 0xDF                      # [len(bare)]
    brackets = folded[(folded == 0x5B) | (folded == 0x5D)].astype(np.int32)  # [number of brackets]
    step = 0x5C - brackets                                                   # +1 opens, -1 closes
    return int(np.cumsum(step).max(initial=0))


def check_json_body(body: bytes) -> None:
    """Raises a 400 OpenAIError when `body` nests too deep or holds an unpaired surrogate."""
    check_json_depth(body)
    check_surrogates(body)


def check_surrogates(body: bytes) -> None:
    """Raises a 400 OpenAIError naming the field when a string (or key) of `body` holds an unpaired surrogate."""
    if not _SURROGATE_ESCAPE.search(body):
        return
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return       # not JSON: the handler's parser answers 400
    path = _lone_surrogate_path(data, [])
    if path is not None:
        param = ".".join(path) or None
        where = f" at '{param}'" if param else ""
        raise invalid_request(f"the request body holds an unpaired UTF-16 surrogate (\\ud800-\\udfff){where}; "
                              "strings must be valid Unicode", param=param)


def _lone_surrogate_path(value, path: list[str]) -> list[str] | None:
    """The path to the first string or key that is not valid Unicode (json.loads pairs proper surrogates
    into one character, so any surrogate left is unpaired), or None."""
    if isinstance(value, str):
        return None if _is_unicode(value) else path
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        if isinstance(key, str) and not _is_unicode(key):
            return path + [key.encode("utf-8", "backslashreplace").decode()]
        found = _lone_surrogate_path(item, path + [str(key)])
        if found is not None:
            return found
    return None


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_json_depth(body: bytes) -> None:
    """Raises a 400 OpenAIError when `body` nests deeper than MAX_JSON_DEPTH."""
    # cheap exit: fewer brackets in all than the limit cannot nest past it
    if body.count(b"[") + body.count(b"{") <= MAX_JSON_DEPTH:
        return
    depth = json_depth(body)
    if depth > MAX_JSON_DEPTH:
        raise invalid_request(f"the request body nests arrays/objects {depth} levels deep; "
                              f"at most {MAX_JSON_DEPTH} are allowed")


class BodyGuardMiddleware:
    """Pure ASGI: reads the body of POST/PUT/PATCH requests (413 as soon as it passes `payload_limit` bytes,
    0: no limit), answers 400 when check_json_body refuses it, else hands the same body on (one message)
    and then the client's later messages (so disconnects are still seen)."""

    def __init__(self, app, payload_limit: int = 0, on_reject=None):
        self.app = app
        self.payload_limit = payload_limit
        self.on_reject = on_reject      # called with (scope, OpenAIError) to log the rejection

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in _BODY_METHODS:
            await self.app(scope, receive, send)
            return
        chunks, received, early = [], 0, None
        size = _declared_length(scope)          # the Content-Length, then at least what has arrived
        while not (self.payload_limit and size > self.payload_limit):
            message = await receive()
            if message["type"] != "http.request":
                early = message                 # the client left while sending
                break
            chunk = message.get("body", b"")
            chunks.append(chunk)
            received += len(chunk)
            size = max(size, received)
            if not message.get("more_body", False):
                break
        try:
            if self.payload_limit and size > self.payload_limit:
                raise payload_too_large(size, self.payload_limit)
            body = b"".join(chunks)
            if early is None:
                check_json_body(body)
        except OpenAIError as err:
            if self.on_reject is not None:
                self.on_reject(scope, err)
            await err.response()(scope, receive, send)
            return
        pending = [{"type": "http.request", "body": body, "more_body": False}]
        if early is not None:
            pending.append(early)

        async def replay():
            return pending.pop(0) if pending else await receive()

        await self.app(scope, replay, send)


def _declared_length(scope) -> int:
    """The request's Content-Length (0 when absent or not a number)."""
    for name, value in scope.get("headers") or ():
        if name == b"content-length":
            return int(value) if value.isdigit() else 0
    return 0
