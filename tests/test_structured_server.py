"""Structured output, logit_bias and tools over HTTP: a real `python -m jaxpaged.server` on a tiny random
Llama whose chat template renders tools (Hermes style), driven by the official openai client (streaming
included); plus in-process checks of the 400s on FakeEngine."""
from __future__ import annotations

import json
import shutil

import httpx
import jsonschema
import openai
import pytest
from fastapi.testclient import TestClient

from jaxpaged.server.app import build_app
from tests.fake_engine import FakeEngine
from tests.server_utils import ServerProcess

TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nYou may call these tools:\n{% for tool in tools %}{{ tool | tojson }}\n"
    "{% endfor %}Reply with <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call><|im_end|>\n{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message.tool_calls %}{% for call in message.tool_calls %}<tool_call>"
    "{{ {'name': call.function.name, 'arguments': call.function.arguments} | tojson }}</tool_call>{% endfor %}"
    "{% else %}{{ message['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"utc": {"type": "boolean"}},
                                       "required": ["utc"], "additionalProperties": False}}}
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0,
                                                                             "maximum": 99}},
          "required": ["ok", "n"], "additionalProperties": False}
MSGS = [{"role": "user", "content": "What is the weather in Paris?"}]
FORCED_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>'


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory):
    model = tmp_path_factory.mktemp("tiny-tools")
    shutil.copytree(tiny_llama, model, dirs_exist_ok=True)
    cfg_path = model / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = TOOLS_TEMPLATE
    cfg_path.write_text(json.dumps(cfg))
    (model / "chat_template.jinja").unlink(missing_ok=True)
    proc = ServerProcess(["--model", str(model), "--max-model-len", "1024", "--block-size", "16",
                          "--num-kv-blocks", "256", "--max-num-seqs", "4", "--max-num-batched-tokens", "256",
                          "--enforce-eager", "--served-model-name", "tiny", "--tool-call-parser", "hermes",
                          "--enable-auto-tool-choice",
                          "--download-dir", str(tmp_path_factory.mktemp("srv-cache"))])
    proc.model_dir = str(model)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=300)


def _post(server, path, body):
    return httpx.post(server.url + path, json={"model": "tiny", **body}, timeout=300)


def test_chat_json_schema_and_json_object(server, client):
    stopped = 0
    for seed in range(4):
        r = client.chat.completions.create(
            model="tiny", messages=MSGS, temperature=1.0, seed=seed, max_tokens=80,
            response_format={"type": "json_schema", "json_schema": {"name": "r", "schema": SCHEMA}})
        ch = r.choices[0]
        if ch.finish_reason == "stop":
            stopped += 1
            jsonschema.validate(json.loads(ch.message.content), SCHEMA)
    assert stopped >= 3
    r = _post(server, "/v1/completions", {"prompt": "Hello", "max_tokens": 80, "temperature": 0,
                                          "response_format": {"type": "json_object"}}).json()
    if r["choices"][0]["finish_reason"] == "stop":
        assert isinstance(json.loads(r["choices"][0]["text"]), dict)


def test_completions_structured_outputs_extra_field_and_streaming(server, client):
    r = client.completions.create(model="tiny", prompt="Hello", max_tokens=20, n=3, temperature=1.0, seed=3,
                                  extra_body={"structured_outputs": {"choice": ["alpha", "beta", "gamma"]}})
    assert {c.text for c in r.choices} <= {"alpha", "beta", "gamma"}
    assert [c.finish_reason for c in r.choices] == ["stop"] * 3
    text = "".join(chunk.choices[0].text for chunk in client.completions.create(
        model="tiny", prompt="Hi", max_tokens=20, stream=True, temperature=0,
        extra_body={"structured_outputs": {"regex": "[a-d]{3}-[0-9]{2}"}}))
    assert len(text) == 6 and text[3] == "-"


@pytest.mark.parametrize("body,param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nope"}}}}, "response_format"),
    ({"response_format": {"type": "yaml"}}, "response_format"),
    ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs"),
    ({"structured_outputs": {"grammar": "start: missing_rule"}}, "structured_outputs"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"structured_outputs": {"choice": ["a"]}, "guided_regex": "b"}, "guided_regex"),
    ({"logit_bias": {"100000": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"logit_bias": {"x": 1}}, "logit_bias"),
])
def test_bad_constraints_are_400_naming_the_field(server, body, param):
    for path, extra in (("/v1/completions", {"prompt": "Hi"}), ("/v1/chat/completions", {"messages": MSGS})):
        r = _post(server, path, {**extra, **body})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param, r.text
    assert _post(server, "/v1/completions", {"prompt": "Hi", "max_tokens": 1}).status_code == 200


def test_logit_bias_steers_greedy_output(server, client):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(server.model_dir)
    r = client.completions.create(model="tiny", prompt="Hello", max_tokens=4, temperature=0,
                                  logit_bias={"77": 100})
    assert r.choices[0].text == tok.decode([77] * 4)
    r = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=4, temperature=0,
                                       logit_bias={"77": 100})
    assert r.choices[0].message.content == tok.decode([77] * 4)


def _args_ok(call, tool):
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])


def test_named_and_required_tool_choice(server, client):
    named = {"type": "function", "function": {"name": "get_weather"}}
    done = 0
    for seed in range(3):
        r = client.chat.completions.create(model="tiny", messages=MSGS, tools=[WEATHER, TIME], tool_choice=named,
                                           temperature=1.0, seed=seed, max_tokens=80)
        ch = r.choices[0]
        (call,) = ch.message.tool_calls
        assert call.type == "function" and call.function.name == "get_weather" and call.id
        if ch.finish_reason == "stop":
            done += 1
            _args_ok(call, WEATHER)
    assert done >= 2
    # the same request streamed: the arguments arrive as deltas of one call
    chunks = list(client.chat.completions.create(model="tiny", messages=MSGS, tools=[WEATHER, TIME],
                                                 tool_choice=named, temperature=1.0, seed=0, max_tokens=80,
                                                 stream=True))
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].function.name == "get_weather" and deltas[0].id
    first = client.chat.completions.create(model="tiny", messages=MSGS, tools=[WEATHER, TIME], tool_choice=named,
                                           temperature=1.0, seed=0, max_tokens=80)
    assert "".join(d.function.arguments or "" for d in deltas) == first.choices[0].message.tool_calls[0].function.arguments
    r = client.chat.completions.create(model="tiny", messages=MSGS, tools=[WEATHER, TIME], tool_choice="required",
                                       temperature=0.7, seed=1, max_tokens=150)
    ch = r.choices[0]
    if ch.finish_reason == "tool_calls":
        assert ch.message.tool_calls and ch.message.content is None
        for call in ch.message.tool_calls:
            _args_ok(call, {"get_weather": WEATHER, "get_time": TIME}[call.function.name])
    else:
        assert ch.finish_reason == "length"


def test_auto_tool_choice_parses_hermes_calls_streamed_and_not(server, client):
    force = {"structured_outputs": {"choice": [FORCED_CALL]}}   # the output a tool-calling model would write
    r = client.chat.completions.create(model="tiny", messages=MSGS, tools=[WEATHER], max_tokens=200,
                                       temperature=0, extra_body=force)
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls" and ch.message.content is None
    (call,) = ch.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris", "days": 2}
    chunks = list(client.chat.completions.create(model="tiny", messages=MSGS, tools=[WEATHER], max_tokens=200,
                                                 temperature=0, extra_body=force, stream=True))
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert [c.function.name for c in calls] == ["get_weather"]
    assert json.loads(calls[0].function.arguments) == {"city": "Paris", "days": 2}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    # tools are rendered into the prompt by the chat template (tool_choice "none": they are not)
    plain = client.chat.completions.create(model="tiny", messages=MSGS, tools=[WEATHER], tool_choice="none",
                                           max_tokens=1, temperature=0)
    assert r.usage.prompt_tokens > plain.usage.prompt_tokens + 20
    assert plain.choices[0].message.tool_calls in (None, [])
    # the next turn: the assistant's call and the tool's result are accepted
    history = MSGS + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                      {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'}]
    r2 = client.chat.completions.create(model="tiny", messages=history, tools=[WEATHER], max_tokens=5, temperature=0)
    assert r2.choices[0].finish_reason in ("stop", "length")
    assert r2.usage.prompt_tokens > r.usage.prompt_tokens


def test_tool_choice_errors_in_process():
    with TestClient(build_app(FakeEngine(max_model_len=64), "fake-model")) as c:
        def err(body):
            r = c.post("/v1/chat/completions", json={"messages": MSGS, **body})
            assert r.status_code == 400, r.text
            return r.json()["error"]["param"]
        assert err({"tools": [WEATHER]}) == "tool_choice"           # auto without --enable-auto-tool-choice
        assert err({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}) \
            == "tool_choice"
        assert err({"tool_choice": "required"}) == "tool_choice"
        assert err({"tools": [{"type": "function"}], "tool_choice": "none"}) == "tools"
        assert err({"tools": [WEATHER], "tool_choice": "required",
                    "response_format": {"type": "json_object"}}) == "tool_choice"
        r = c.post("/v1/chat/completions", json={"messages": MSGS, "tools": [WEATHER], "tool_choice": "none",
                                                 "max_tokens": 2})
        assert r.status_code == 200, r.text
