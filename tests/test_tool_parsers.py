"""Tool-call parsers (hermes, llama3_json) and the chat stream's tool-call deltas, without a model."""
from __future__ import annotations

import json

from jaxpaged.server.serving_tools import ToolPlan, ToolStream, finish_reason, tool_calls_of
from jaxpaged.server.tool_parsers import HermesToolParser, Llama3JsonToolParser

CALL_A = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
CALL_B = '{"name": "get_time", "arguments": {}}'


def test_hermes_calls_content_and_malformed():
    p = HermesToolParser()
    content, calls = p.extract(f"Let me check.\n<tool_call>\n{CALL_A}\n</tool_call>\n<tool_call>{CALL_B}</tool_call>")
    assert content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"}),
                                                                   ("get_time", {})]
    assert calls[0].id != calls[1].id and calls[0].to_openai()["type"] == "function"
    assert p.extract("no calls here") == ("no calls here", [])
    assert p.extract("<tool_call>{not json}</tool_call>") == ("<tool_call>{not json}</tool_call>", [])
    # an unterminated last call (cut at max_tokens with the JSON complete) still parses
    assert p.extract(f"<tool_call>{CALL_A}")[1][0].name == "get_weather"


def test_hermes_content_end_holds_back_a_possible_marker():
    p = HermesToolParser()
    assert p.content_end("Hello") == 5
    assert p.content_end("Hello <tool") == 6
    assert p.content_end("Hello <tool_call>{") == 6
    assert p.content_end("a < b") == 5


def test_llama3_json_calls():
    p = Llama3JsonToolParser()
    _, calls = p.extract('<|python_tag|>{"name": "f", "parameters": {"x": 1}}; {"name": "g", "parameters": {}}')
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("f", {"x": 1}), ("g", {})]
    assert p.extract('{"name": "f", "arguments": {"y": 2}}')[1][0].arguments == '{"y": 2}'
    assert p.extract("Paris is the capital.") == ("Paris is the capital.", [])
    assert p.extract('{"not_a_call": 1}') == ('{"not_a_call": 1}', [])
    assert p.content_end("  {") == 0 and p.content_end("<|pyt") == 0 and p.content_end("Hi") == 2


def _stream(plan, pieces):
    ts, text, out = ToolStream(plan), "", []
    for i, piece in enumerate(pieces):
        text += piece
        out += ts.deltas(text, finished=i == len(pieces) - 1)
    return ts, out


def test_named_call_streams_argument_pieces():
    plan = ToolPlan("named", name="get_weather")
    ts, deltas = _stream(plan, ['{"ci', 'ty": "Pa', 'ris"}'])
    first = deltas[0]["tool_calls"][0]
    assert first["index"] == 0 and first["id"] and first["function"]["name"] == "get_weather"
    assert "".join(d["tool_calls"][0]["function"]["arguments"] for d in deltas) == '{"city": "Paris"}'
    assert all("name" not in d["tool_calls"][0]["function"] for d in deltas[1:])
    assert finish_reason(plan, ts.calls, "stop") == "stop"


def test_auto_streams_content_then_whole_calls():
    plan = ToolPlan("auto", parser=HermesToolParser())
    ts, deltas = _stream(plan, ["Sure. ", "<tool", "_call>", CALL_A, "</tool_call>"])
    content = "".join(d.get("content", "") for d in deltas)
    assert content == "Sure. "
    (calls,) = [d["tool_calls"] for d in deltas if "tool_calls" in d]
    assert calls[0]["function"]["name"] == "get_weather" and calls[0]["index"] == 0
    assert finish_reason(plan, ts.calls, "stop") == "tool_calls"
    # no call in the end: the held-back text is sent as content
    ts, deltas = _stream(plan, ["a <tool", "box"])
    assert "".join(d.get("content", "") for d in deltas) == "a <toolbox" and not ts.calls


def test_required_output_becomes_calls():
    plan = ToolPlan("required")
    content, calls = tool_calls_of(plan, '[{"name": "get_time", "parameters": {"utc": true}}]')
    assert content is None and calls[0].name == "get_time" and json.loads(calls[0].arguments) == {"utc": True}
    assert tool_calls_of(plan, '[{"name": "get_ti') == ('[{"name": "get_ti', [])     # cut by max_tokens
    assert finish_reason(plan, calls, "stop") == "tool_calls" and finish_reason(plan, [], "length") == "length"
