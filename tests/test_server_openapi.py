"""/openapi.json tells the truth: error statuses and bodies, /tokenize's body, /health and /metrics content
types; and a bounded, deterministic schemathesis run against a live server (FakeEngine) finds nothing.

The schemathesis run uses every check but positive_data_acceptance: a schema cannot state the rules
that span fields or depend on the prompt's tokens (prompt tokens + max_tokens <= max_model_len,
min_tokens <= max_tokens, top_logprobs needs logprobs, ...), nor that integers are strict (JSON
Schema counts 1.0 as an integer; the server refuses it), so schema-valid bodies the server rightly
refuses with a 400 would count as failures. The value ranges the schema does state are checked by
negative_data_rejection.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
from fastapi.testclient import TestClient

from jaxpaged.server.app import build_app
from jaxpaged.server.limits import ServerLimits
from jaxpaged.server.openapi import ErrorResponse
from tests.fake_engine import FakeEngine
from tests.server_utils import ServerProcess, wait_for


@pytest.fixture(scope="module")
def app_client():
    app = build_app(FakeEngine(max_model_len=64), "m", api_key="k", limits=ServerLimits(max_queued_requests=0))
    with TestClient(app) as client:
        yield client


def test_document_lists_real_statuses_and_bodies(app_client):
    doc = app_client.get("/openapi.json").json()
    ops = {(m, p): op for p, item in doc["paths"].items() for m, op in item.items()}
    assert not any("422" in op["responses"] for op in ops.values())
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    error_ref = {"$ref": "#/components/schemas/ErrorResponse"}
    for key in (("post", "/v1/completions"), ("post", "/v1/chat/completions")):
        responses = ops[key]["responses"]
        assert {"200", "400", "401", "404", "429"} <= set(responses)
        assert all(responses[s]["content"]["application/json"]["schema"] == error_ref for s in ("400", "401", "429"))
        assert responses["429"]["headers"]["Retry-After"]["required"] is True
        assert set(responses["200"]["content"]) == {"application/json", "text/event-stream"}
        assert ops[key]["security"] == [{"bearer": []}]
    body = ops[("post", "/tokenize")]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"oneOf": [{"$ref": "#/components/schemas/TokenizeCompletionRequest"},
                              {"$ref": "#/components/schemas/TokenizeChatRequest"}]}
    assert "content" not in ops[("get", "/health")]["responses"]["200"]
    assert set(ops[("get", "/metrics")]["responses"]["200"]["content"]) == {"text/plain"}
    assert "security" not in ops[("get", "/health")] and doc["components"]["securitySchemes"]["bearer"]


def test_document_states_value_ranges(app_client):
    schemas = app_client.get("/openapi.json").json()["components"]["schemas"]
    props = schemas["CompletionRequest"]["properties"]
    assert props["top_p"]["anyOf"][0] == {"type": "number", "exclusiveMinimum": 0, "maximum": 1}
    assert props["n"]["anyOf"][0]["maximum"] == 64                         # FakeEngine's max_num_seqs
    assert props["logprobs"]["anyOf"][0]["maximum"] == 20
    token_ids = props["prompt"]["anyOf"][2]
    assert token_ids["minItems"] == 1 and token_ids["items"]["maximum"] == 319     # vocab_size 320
    assert props["prompt"]["anyOf"][1]["maxItems"] == 256                 # --max-client-batch-size
    assert props["seed"]["anyOf"][0]["maximum"] == 2 ** 63 - 1
    assert schemas["ChatCompletionRequest"]["properties"]["messages"]["minItems"] == 1


def test_answers_match_the_document(app_client):
    auth = {"Authorization": "Bearer k"}
    r = app_client.get("/health")
    assert r.status_code == 200 and r.content == b"" and "content-type" not in r.headers
    assert app_client.get("/metrics").headers["content-type"].startswith("text/plain")
    for path, body, headers, status in [
            ("/v1/completions", {"prompt": 1}, auth, 400), ("/v1/completions", {"prompt": "x"}, {}, 401),
            ("/v1/chat/completions", {"model": "nope", "messages": []}, auth, 404),
            ("/tokenize", {"messages": "x"}, {}, 400), ("/detokenize", {"tokens": [-1]}, {}, 400)]:
        r = app_client.post(path, json=body, headers=headers)
        assert r.status_code == status, (path, r.text)
        ErrorResponse.model_validate(r.json())       # exactly OpenAI's error body (extra keys are refused)


class _CrashingEngine(FakeEngine):
    """The engine thread's first look at the engine raises: the thread dies (as on a device failure)."""

    def has_unfinished_requests(self):
        raise RuntimeError("device lost")


def test_dead_engine_health_is_a_503_error_body():
    with TestClient(build_app(_CrashingEngine(max_model_len=64), "m")) as client:
        r = wait_for(lambda: (lambda r: r if r.status_code == 503 else None)(client.get("/health")), timeout=30,
                     what="/health to report the dead engine")
        assert "device lost" in ErrorResponse.model_validate(r.json()).error.message
        assert r.json()["error"]["type"] == "service_unavailable"


def test_schemathesis_finds_no_failure(tmp_path):
    server = ServerProcess(["--model", "fake-model", "--engine-factory", "tests.server_utils:make_fake_engine",
                            "--max-model-len", "128", "--default-max-tokens", "16", "--api-key", "st-key"])
    try:
        cmd = [sys.executable, "-m", "schemathesis.cli", "run", server.url + "/openapi.json",
               "-H", "Authorization: Bearer st-key", "--checks", "all",
               "--exclude-checks", "positive_data_acceptance", "--phases", "fuzzing", "--max-examples", "40",
               "--generation-deterministic", "--workers", "1", "--request-timeout", "60", "--no-color"]
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
        out = run.stdout + run.stderr
        assert run.returncode == 0, out[-6000:]
        assert "passed" in out and " failed" not in out, out[-3000:]
        assert "Traceback" not in server.output(), server.output()[-3000:]
    finally:
        server.stop()
