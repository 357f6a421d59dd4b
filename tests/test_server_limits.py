"""Hostile input and operator limits, in-process on FakeEngine (tests/fake_engine.py).

Deep JSON nesting on every JSON endpoint is a 400 logged in one line; a full waiting queue answers
429 with Retry-After while the queued requests complete; the prompts-per-request cap and the
default max_tokens cap of chat; the limit flags.
"""
from __future__ import annotations

import asyncio
import logging
import threading

import httpx
import pytest
from fastapi.testclient import TestClient

from jaxpaged.server.app import build_app
from jaxpaged.server.body_guard import MAX_JSON_DEPTH, json_depth
from jaxpaged.server.cli import parse_args
from jaxpaged.server.limits import ServerLimits
from tests.fake_engine import FakeEngine

JSON_ENDPOINTS = ["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"]


@pytest.fixture(scope="module")
def client():
    with TestClient(build_app(FakeEngine(max_model_len=64), "m")) as c:
        yield c


def _nested_arrays(depth: int) -> str:
    return "[" * depth + "]" * depth


def _nested_objects(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


def test_json_depth_counts_only_structure():
    assert json_depth(b'{"prompt": "[[[[{{{{", "x": [[1], [2, [3]]]}') == 4
    assert json_depth(b'"\\"[[[\\""') == 0          # escaped quotes do not end the string
    assert json_depth(_nested_arrays(1000).encode()) == 1000


@pytest.mark.parametrize("path", JSON_ENDPOINTS)
@pytest.mark.parametrize("deep", [_nested_arrays(1000), _nested_objects(2000)], ids=["arrays1000", "objects2000"])
def test_deep_nesting_is_a_400_logged_once(client, caplog, path, deep):
    bodies = [deep, '{"prompt": %s, "messages": [], "tokens": [1]}' % deep,
              '{"prompt": "x", "chat_template_kwargs": %s}' % deep]
    for body in bodies:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="jaxpaged.server"):
            r = client.post(path, content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400, (path, body[:40], r.text)
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and f"at most {MAX_JSON_DEPTH}" in err["message"]
        records = [rec for rec in caplog.records if rec.name == "jaxpaged.server"]
        assert len(records) == 1 and records[0].exc_info is None, [rec.getMessage() for rec in records]
        assert f"POST {path} -> 400" in records[0].getMessage()


def test_nesting_within_the_limit_passes(client):
    kwargs = '{"prompt": "Hello", "max_tokens": 1, "chat_template_kwargs": %s}' % _nested_objects(MAX_JSON_DEPTH - 1)
    r = client.post("/v1/completions", content=kwargs, headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", '{"prompt": "a\\ud800b", "max_tokens": 1}', "prompt"),
    ("/v1/completions", '{"prompt": "hi", "stop": ["x", "\\udc00"]}', "stop.1"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\udfff"}]}', "messages.0.content"),
    ("/v1/chat/completions", '{"model": "\\ud800", "messages": []}', "model"),
    ("/tokenize", '{"prompt": "\\ud83d"}', "prompt"),
    ("/detokenize", '{"tokens": [5], "model": "\\ud800"}', "model"),
])
def test_unpaired_surrogates_are_a_400_naming_the_field(client, path, body, param):
    r = client.post(path, content=body.encode(), headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and "surrogate" in r.json()["error"]["message"]


def test_paired_surrogates_and_escaped_backslashes_pass(client):
    for prompt in ('"\\ud83d\\ude00 smile"', '"a literal \\\\ud800"', '"nul \\u0000 byte"'):
        body = '{"prompt": %s, "max_tokens": 1}' % prompt
        r = client.post("/v1/completions", content=body.encode(), headers={"content-type": "application/json"})
        assert r.status_code == 200, (prompt, r.text)


def test_invalid_requests_log_one_line_without_traceback(client, caplog):
    with caplog.at_level(logging.INFO, logger="jaxpaged.server"):
        assert client.post("/tokenize", json={"prompt": 3}).status_code == 400
        assert client.post("/v1/completions", json={"prompt": "x", "temperature": -1}).status_code == 400
        assert client.post("/v1/completions", content=b"{", headers={"content-type": "application/json"}
                           ).status_code == 400
        assert client.post("/v1/completions", json={"prompt": "x", "model": "two\nlines"}).status_code == 404
    records = [rec for rec in caplog.records if rec.name == "jaxpaged.server"]
    assert len(records) == 4 and all(rec.exc_info is None for rec in records)
    assert "(param temperature)" in records[1].getMessage()
    assert all("\n" not in rec.getMessage() for rec in records) and "two\\nlines" in records[3].getMessage()


def test_prompts_per_request_cap():
    with TestClient(build_app(FakeEngine(max_model_len=64), "m", limits=ServerLimits(max_client_batch_size=3))) as c:
        ok = c.post("/v1/completions", json={"prompt": ["a", "b", "c"], "max_tokens": 1})
        assert ok.status_code == 200 and len(ok.json()["choices"]) == 3
        for prompt in (["a"] * 4, [[5, 6]] * 4):
            r = c.post("/v1/completions", json={"prompt": prompt, "max_tokens": 1})
            assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
            assert "at most 3" in r.json()["error"]["message"]
        # one token-id prompt of any length is one prompt
        assert c.post("/v1/completions", json={"prompt": [5] * 10, "max_tokens": 1}).status_code == 200


def test_payload_limit_is_a_413():
    with TestClient(build_app(FakeEngine(max_model_len=64), "m", limits=ServerLimits(payload_limit=200))) as c:
        assert c.post("/tokenize", json={"prompt": "x" * 150}).status_code == 200
        r = c.post("/v1/completions", json={"prompt": "x" * 300, "max_tokens": 1})
        assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large", r.text

        def chunked():        # no Content-Length: counted as it arrives
            yield b'{"prompt": "'
            for _ in range(10):
                yield b"y" * 50
            yield b'"}'
        r = c.post("/tokenize", content=chunked(), headers={"content-type": "application/json"})
        assert r.status_code == 413 and "at most 200" in r.json()["error"]["message"], r.text
        assert c.post("/tokenize", json={"prompt": "ok"}).status_code == 200


def test_default_max_tokens_caps_chat():
    chat = {"messages": [{"role": "user", "content": "Hi"}], "ignore_eos": True}
    with TestClient(build_app(FakeEngine(max_model_len=256), "m", limits=ServerLimits(default_max_tokens=5))) as c:
        r = c.post("/v1/chat/completions", json=chat).json()
        assert r["usage"]["completion_tokens"] == 5 and r["choices"][0]["finish_reason"] == "length"
        r = c.post("/v1/chat/completions", json={**chat, "max_tokens": 9}).json()
        assert r["usage"]["completion_tokens"] == 9        # an explicit max_tokens is not capped
        r = c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": None, "ignore_eos": True}).json()
        assert r["usage"]["completion_tokens"] == 5
    with TestClient(build_app(FakeEngine(max_model_len=64), "m", limits=ServerLimits(default_max_tokens=0))) as c:
        r = c.post("/v1/chat/completions", json=chat).json()
        # no cap: the whole context that is left
        assert r["usage"]["prompt_tokens"] + r["usage"]["completion_tokens"] == 64


class _GatedEngine(FakeEngine):
    """Makes no progress (every request stays waiting) until `gate` is set."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.gate = threading.Event()

    def step(self):
        if not self.gate.is_set():
            self.gate.wait(0.005)
            return []
        return super().step()


def test_full_queue_answers_429_and_queued_requests_complete():
    engine = _GatedEngine(max_model_len=64)
    app = build_app(engine, "m", limits=ServerLimits(max_queued_requests=2))

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport,
                                                                        base_url="http://t") as c:
            body = {"prompt": "Hello", "max_tokens": 3}
            queued = [asyncio.ensure_future(c.post("/v1/completions", json=body)) for _ in range(2)]
            while engine.get_stats().num_waiting < 2:      # both are in the engine's waiting queue
                await asyncio.sleep(0.01)
            full = await c.post("/v1/completions", json=body)
            streamed = await c.post("/v1/completions", json={**body, "stream": True})
            batch = await c.post("/v1/completions", json={**body, "prompt": ["a", "b"]})
            engine.gate.set()
            done = await asyncio.gather(*queued)
            after = await c.post("/v1/completions", json=body)
            return full, streamed, batch, done, after

    full, streamed, batch, done, after = asyncio.run(main())
    for r in (full, streamed, batch):
        assert r.status_code == 429, r.text
        assert r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "rate_limit_exceeded"
    assert [r.status_code for r in done] == [200, 200]
    assert all(r.json()["usage"]["completion_tokens"] == 3 for r in done)
    assert after.status_code == 200
    assert engine.get_stats().kv_cache_usage == 0.0 and not engine.requests


def test_limit_flags():
    args, _ = parse_args([])
    assert args.limits == ServerLimits()
    args, _ = parse_args(["--max-queued-requests", "0", "--max-client-batch-size", "8", "--default-max-tokens", "0",
                          "--payload-limit", "1000"])
    assert args.limits == ServerLimits(max_queued_requests=0, max_client_batch_size=8, default_max_tokens=0,
                                       payload_limit=1000)
    args, _ = parse_args(["--override-generation-config", '{"max_new_tokens": 77}'])
    assert args.limits.default_max_tokens == 77
    for bad in (["--max-client-batch-size", "0"], ["--max-queued-requests", "-1"],
                ["--override-generation-config", '{"temperature": 0.5}']):
        with pytest.raises(SystemExit):
            parse_args(bad)


class _BuggyEngine(FakeEngine):
    """add_request fails with an error that is no request's fault (a bug)."""

    def add_request(self, *args, **kwargs):
        raise RuntimeError("kaboom")


def test_internal_error_is_a_500_with_one_traceback(caplog):
    with TestClient(build_app(_BuggyEngine(max_model_len=64), "m"), raise_server_exceptions=False) as c:
        with caplog.at_level(logging.INFO, logger="jaxpaged.server"):
            r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
        assert r.status_code == 500 and r.json()["error"]["type"] == "internal_server_error"
        assert "RuntimeError: kaboom" in r.json()["error"]["message"]
        tracebacks = [rec for rec in caplog.records if rec.exc_info]
        assert len(tracebacks) == 1 and "POST /v1/completions" in tracebacks[0].getMessage()
        assert c.get("/health").status_code == 200
