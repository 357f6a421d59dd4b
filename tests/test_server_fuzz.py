"""Hypothesis fuzz of request bodies against ONE real server process: no body, however wrong, gets a 5xx.

Each example starts from a valid small request and replaces some fields with random JSON (wrong
types, out-of-range numbers, nested junk) or sends a body that is not an object at all. Every
answer must be < 500; a 4xx must carry OpenAI's error shape; a 200 stream must end with [DONE]
and carry no in-band server error. Afterwards the server is healthy and holds no KV blocks.
"""
from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.server_utils import ServerProcess, wait_for

API = {"Authorization": "Bearer fuzz"}
SETTINGS = dict(max_examples=200, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

json_scalars = (st.none() | st.booleans() | st.integers() | st.integers(-3, 3)
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8))
json_values = st.recursive(json_scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c,
                                                                                               max_size=3),
                           max_leaves=6)
small_ints = st.integers(-2, 6)
ints = small_ints | st.integers() | st.integers(2 ** 62, 2 ** 64) | json_values
floats = st.floats(-3, 3) | st.floats() | st.integers(-5, 5) | json_values   # NaN and +-Infinity too
bools = st.booleans() | json_values
stops = st.text(max_size=4) | st.lists(st.text(max_size=4), max_size=3) | json_values
token_ids = st.lists(st.integers(-2, 400) | st.integers(), max_size=6)

SAMPLING = {
    "model": st.just("tiny") | json_values,
    "n": st.integers(-1, 3) | ints,
    "best_of": ints,
    "temperature": floats,
    "top_p": floats,
    "top_k": ints,
    "min_p": floats,
    "presence_penalty": floats,
    "frequency_penalty": floats,
    "repetition_penalty": floats,
    "seed": ints,
    "stop": stops,
    "stop_token_ids": token_ids | json_values,
    "stream": bools,
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": bools,
                                                          "continuous_usage_stats": bools}) | json_values,
    "ignore_eos": bools,
    "min_tokens": ints,
    "skip_special_tokens": bools,
    "include_stop_str_in_output": bools,
    "user": st.text(max_size=5) | json_values,
    "logit_bias": st.dictionaries(st.text(max_size=3), floats, max_size=2) | json_values,
}
COMPLETION = {
    **SAMPLING,
    "prompt": (st.text(max_size=30) | token_ids | st.lists(st.text(max_size=8), max_size=3)
               | st.lists(token_ids, max_size=2) | json_values),
    "max_tokens": small_ints | ints,
    "logprobs": st.integers(-1, 25) | ints,
    "echo": bools,
    "suffix": st.none() | json_values,
}
message = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]) | json_values},
                                optional={"content": st.text(max_size=20) | json_values, "name": json_values})
CHAT = {
    **SAMPLING,
    "messages": st.lists(message, max_size=3) | json_values,
    "max_tokens": small_ints | ints,
    "max_completion_tokens": small_ints | ints,
    "logprobs": bools,
    "top_logprobs": st.integers(-1, 25) | ints,
    "response_format": st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object"])}) | json_values,
    "add_generation_prompt": bools,
    "continue_final_message": bools,
    "chat_template_kwargs": json_values,
    "echo": bools,
}


@pytest.fixture(scope="module")
def server(tiny_model_factory):
    from tests.test_server import SERVER_ARGS, _real_engine_available

    args = [a for a in SERVER_ARGS]
    args[args.index("--api-key") + 1] = "fuzz"
    if _real_engine_available():   # same engine flags as test_server.py: its compiled executables are reused
        args = ["--model", tiny_model_factory("llama"), *args]
    else:
        args = ["--model", "fake-model", "--engine-factory", "tests.server_utils:make_fake_engine", *args]
    proc = ServerProcess(args)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers=API, timeout=120) as client:
        yield client


def _post(http, path: str, body) -> httpx.Response:
    # json.dumps writes NaN / Infinity (not JSON, but what a sloppy client sends)
    return http.post(path, content=json.dumps(body), headers={"content-type": "application/json"})


def _check(r: httpx.Response, body) -> None:
    assert r.status_code < 500, (body, r.status_code, r.text[:2000])
    if r.status_code >= 400:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], r.text
        return
    if r.headers.get("content-type", "").startswith("text/event-stream"):
        events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
        assert events and events[-1] == "[DONE]", r.text[-500:]
        for e in events[:-1]:
            assert "error" not in json.loads(e), (body, e)
    else:
        assert "choices" in r.json()


def _body(base: dict, fields: dict):
    """Mostly: the valid base with 1-3 fields replaced; sometimes any JSON value at all."""
    mutated = st.lists(st.sampled_from(sorted(fields)), min_size=1, max_size=3, unique=True).flatmap(
        lambda keys: st.fixed_dictionaries({k: fields[k] for k in keys})).map(lambda d: {**base, **d})
    return st.integers(0, 9).flatmap(lambda i: json_values if i == 0 else mutated)


@settings(**SETTINGS)
@given(body=_body({"model": "tiny", "prompt": "Hello world", "max_tokens": 2}, COMPLETION))
def test_fuzz_completions(http, body):
    _check(_post(http, "/v1/completions", body), body)


@settings(**SETTINGS)
@given(body=_body({"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}, CHAT))
def test_fuzz_chat(http, body):
    _check(_post(http, "/v1/chat/completions", body), body)


@settings(**{**SETTINGS, "max_examples": 50})
@given(path=st.sampled_from(["/tokenize", "/detokenize"]),
       body=st.fixed_dictionaries({}, optional={"prompt": st.text(max_size=10) | json_values,
                                                "messages": st.lists(message, max_size=2) | json_values,
                                                "tokens": token_ids | json_values, "model": json_values,
                                                "add_special_tokens": bools, "return_token_strs": bools}))
def test_fuzz_tokenize(http, path, body):
    r = _post(http, path, body)
    assert r.status_code < 500, (path, body, r.text)


def test_raw_bodies(http):
    for raw in (b"", b"{", b"null", b"[]", b"\xff\xfe", b'{"prompt": NaN}', b'{"prompt": "x", "max_tokens": 1e999}',
                b'{"prompt": "x", "temperature": Infinity}'):
        for path in ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"):
            r = http.post(path, content=raw, headers={"content-type": "application/json"})
            assert r.status_code < 500, (path, raw, r.text)
            if path.startswith("/v1"):
                assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", r.text


def test_server_still_healthy_and_no_leak(server, http):
    assert http.get("/health").status_code == 200
    r = http.post("/v1/completions", json={"model": "tiny", "prompt": "Hello", "max_tokens": 2})
    assert r.status_code == 200

    def idle():
        m = server.metrics()
        return m["jaxpaged:kv_cache_usage_perc"] == 0.0 and m["jaxpaged:num_requests_running"] == 0

    wait_for(idle, timeout=60, what="no KV blocks held after the fuzz")
    assert "Traceback" not in server.output(), server.output()[-3000:]
