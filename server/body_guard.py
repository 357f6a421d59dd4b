"""A guard in front of every JSON endpoint: a body nested deeper than MAX_JSON_DEPTH is a 400 before anything parses it.

Python's json module and pydantic recurse once per nesting level, so a body like `[[[[...]]]]`
1000 levels deep would end in a RecursionError (a 500 and a traceback) somewhere. No request of
the OpenAI API needs more than a handful of levels (a tool's JSON schema perhaps 10-20), so the
limit is generous and fixed.

The check scans the raw bytes once: string literals are cut out (brackets inside strings do not
nest), then the running depth of `[`/`{` minus `]`/`}` is tracked. On valid JSON that is the exact
nesting depth; on invalid JSON the parser that runs next answers 400 anyway.
"""
from __future__ import annotations

import re

import numpy as np

from .errors import OpenAIError, invalid_request

MAX_JSON_DEPTH = 64

# A JSON string literal: quote, runs of plain characters and backslash escapes, quote (unrolled, so fast).
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_BODY_METHODS = {"POST", "PUT", "PATCH"}


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


def check_json_depth(body: bytes) -> None:
    """Raises a 400 OpenAIError when `body` nests deeper than MAX_JSON_DEPTH."""
    # cheap exit: fewer brackets in all than the limit cannot nest past it
    if body.count(b"[") + body.count(b"{") <= MAX_JSON_DEPTH:
        return
    depth = json_depth(body)
    if depth > MAX_JSON_DEPTH:
        raise invalid_request(f"the request body nests arrays/objects {depth} levels deep; "
                              f"at most {MAX_JSON_DEPTH} are allowed")


class JsonDepthMiddleware:
    """Pure ASGI: reads the body of POST/PUT/PATCH requests, answers 400 when it nests too deep, else hands
    the same body on (one message) and then the client's later messages (so disconnects are still seen)."""

    def __init__(self, app, on_reject=None):
        self.app = app
        self.on_reject = on_reject      # called with (scope, OpenAIError) to log the rejection

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in _BODY_METHODS:
            await self.app(scope, receive, send)
            return
        chunks, early = [], None
        while True:
            message = await receive()
            if message["type"] != "http.request":
                early = message                 # the client left while sending
                break
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if early is None:
            try:
                check_json_depth(body)
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
