"""OpenAI tools on /v1/chat/completions: `tools` + `tool_choice` -> what to render, how to constrain, how
to read the output back (vLLM's behaviour).

  tool_choice "none"          tools are not rendered; plain text
  "auto" (default with tools) tools rendered through the chat template's `tools=`; the output is read by
                              the server's --tool-call-parser (needs --enable-auto-tool-choice); calls
                              found -> message.tool_calls, finish_reason "tool_calls"
  "required"                  output constrained to a JSON array of {"name", "parameters"} objects, one
                              schema per tool -> tool_calls, finish_reason "tool_calls"
  {"type": "function", "function": {"name": N}}
                              output constrained to N's parameters schema -> one call to N (finish_reason
                              stays "stop", as OpenAI and vLLM answer a named choice)

Streaming (`ToolStream`): a named call streams its arguments as they are generated; "required" and
the calls of "auto" are sent whole when the output ends (content before an "auto" call streams as usual).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from jaxpaged.structured_output import StructuredOutputsParams

from .errors import invalid_request
from .tool_parsers import TOOL_PARSERS, ToolCall


@dataclass
class ToolPlan:
    mode: str                                   # "none" | "auto" | "required" | "named"
    tools: list[dict] | None = None             # for the chat template (None: not rendered)
    structured: StructuredOutputsParams | None = None
    parser: Any = None                          # "auto": a tool parser
    name: str | None = None                     # "named": the function
    names: list[str] = field(default_factory=list)


def _functions(tools: list) -> list[dict]:
    out = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(fn, dict) \
                or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise invalid_request(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., "
                                  f"'parameters': {{...}}}}}}", param="tools")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise invalid_request(f"tools[{i}].function.parameters must be a JSON schema object", param="tools")
        out.append({"name": fn["name"], "parameters": params})
    return out


def _structured(param: str, schema: dict) -> StructuredOutputsParams:
    try:
        spec = StructuredOutputsParams(json=schema)
        spec.validate()
    except ValueError as exc:
        raise invalid_request(f"{param}: {exc}", param=param) from None
    return spec


def plan_tools(ctx, req) -> ToolPlan:
    tools, choice = req.tools, req.tool_choice
    if not tools:
        if choice not in (None, "none"):
            raise invalid_request("tool_choice requires tools", param="tool_choice")
        return ToolPlan("none")
    fns = _functions(tools)
    names = [f["name"] for f in fns]
    if choice is None:
        choice = "auto"
    if choice == "none":
        return ToolPlan("none", names=names)
    if choice == "auto":
        if not (ctx.enable_auto_tool_choice and ctx.tool_call_parser):
            raise invalid_request('"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser '
                                  'to be set', param="tool_choice")
        return ToolPlan("auto", tools=tools, parser=TOOL_PARSERS[ctx.tool_call_parser](), names=names)
    if choice == "required":
        one_call = [{"type": "object", "properties": {"name": {"type": "string", "enum": [f["name"]]},
                                                      "parameters": f["parameters"]},
                     "required": ["name", "parameters"], "additionalProperties": False} for f in fns]
        schema = {"type": "array", "minItems": 1, "items": {"anyOf": one_call}}
        if req.parallel_tool_calls is False:
            schema["maxItems"] = 1
        return ToolPlan("required", tools=tools, structured=_structured("tools", schema), names=names)
    if isinstance(choice, dict) and choice.get("type", "function") == "function" \
            and isinstance(choice.get("function"), dict) and isinstance(choice["function"].get("name"), str):
        name = choice["function"]["name"]
        fn = next((f for f in fns if f["name"] == name), None)
        if fn is None:
            raise invalid_request(f"tool_choice names the function {name!r}, which is not in tools {names}",
                                  param="tool_choice")
        return ToolPlan("named", tools=tools, structured=_structured("tools", fn["parameters"]), name=name,
                        names=names)
    raise invalid_request("tool_choice must be 'none', 'auto', 'required' or {'type': 'function', "
                          "'function': {'name': ...}}", param="tool_choice")


def tool_calls_of(plan: ToolPlan, text: str) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of a finished output under the plan."""
    if plan.mode == "named":
        return None, [ToolCall(plan.name, text)]
    if plan.mode == "required":
        try:
            items = json.loads(text)
        except ValueError:
            return text, []          # cut short (max_tokens): the text stays content
        calls = [ToolCall(c["name"], json.dumps(c.get("parameters", {}), ensure_ascii=False))
                 for c in items if isinstance(c, dict) and isinstance(c.get("name"), str)]
        return (None, calls) if calls else (text, [])
    if plan.mode == "auto":
        return plan.parser.extract(text)
    return text, []


def finish_reason(plan: ToolPlan, calls: list, reason: str | None) -> str | None:
    """vLLM's rule: "tool_calls" when auto found calls or required ended normally; named keeps "stop"."""
    if reason == "stop" and calls and plan.mode in ("auto", "required"):
        return "tool_calls"
    return reason


class ToolStream:
    """Per choice: turns the growing text into OpenAI chat deltas under a plan."""

    def __init__(self, plan: ToolPlan):
        self.plan = plan
        self.sent = 0                    # characters of text already sent (as content or arguments)
        self.call: ToolCall | None = ToolCall(plan.name, "") if plan.mode == "named" else None
        self.calls: list[ToolCall] = []

    def deltas(self, text: str, finished: bool) -> list[dict]:
        plan = self.plan
        if plan.mode == "none":
            new, self.sent = text[self.sent:], len(text)
            return [{"content": new}] if new else []
        if plan.mode == "named":
            new = text[self.sent:]
            first = self.sent == 0 and (new or finished)
            self.sent = len(text)
            if not (new or first):
                return []
            self.calls = [self.call]
            fn = {"name": self.call.name, "arguments": new} if first else {"arguments": new}
            head = {"id": self.call.id, "type": "function"} if first else {}
            return [{"tool_calls": [{"index": 0, **head, "function": fn}]}]
        out = []
        calls = tool_calls_of(plan, text)[1] if finished else []
        if plan.mode == "auto":
            # content streams up to a (possible) call; at the end, all of it when there is no call
            end = len(text) if finished and not calls else plan.parser.content_end(text)
            if end > self.sent:
                out.append({"content": text[self.sent:end]})
                self.sent = end
        if finished:
            if calls:
                self.calls = calls
                out.append({"tool_calls": [c.to_openai(index=i) for i, c in enumerate(calls)]})
            elif self.sent < len(text):
                out.append({"content": text[self.sent:]})
            self.sent = len(text)
        return out
