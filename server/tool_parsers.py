"""Tool-call parsers for `tool_choice: "auto"`: the model's text -> (content, tool calls), like vLLM's
`--tool-call-parser`.

  hermes        <tool_call>{"name": ..., "arguments": {...}}</tool_call>, any number, text around them
                is content (Hermes, Qwen 2.5/3 and many fine-tunes use this format)
  llama3_json   the whole output is one JSON object {"name": ..., "parameters": {...}} (or several
                separated by ";"), optionally after <|python_tag|> (Llama 3.1/3.2's JSON tool format)

A parser also says, while a response streams, how much of the text is certainly content
(`content_end`): text from a possible tool-call start on is held back until the end.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass


@dataclass
class ToolCall:
    name: str
    arguments: str            # JSON text, as OpenAI sends it
    id: str = ""

    def __post_init__(self):
        if not self.id:
            self.id = f"chatcmpl-tool-{uuid.uuid4().hex}"

    def to_openai(self, index: int | None = None) -> dict:
        out = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        if index is not None:
            out["index"] = index
        return out


def _call_from_object(obj, args_key: str) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get(args_key, obj.get("arguments", obj.get("parameters", {})))
    return ToolCall(obj["name"], args if isinstance(args, str) else json.dumps(args, ensure_ascii=False))


class HermesToolParser:
    START, END = "<tool_call>", "</tool_call>"
    _CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)

    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        if self.START not in text:
            return text, []
        calls = []
        for body in self._CALL.findall(text):
            try:
                call = _call_from_object(json.loads(body), "arguments")
            except ValueError:
                call = None
            if call is None:
                return text, []          # malformed: the text stays content, as vLLM does
            calls.append(call)
        content = text[: text.index(self.START)].strip()
        return content or None, calls

    def content_end(self, text: str) -> int:
        """Characters of `text` that can be streamed as content now."""
        i = text.find(self.START)
        if i >= 0:
            return i
        return _safe_prefix(text, self.START)


class Llama3JsonToolParser:
    TAG = "<|python_tag|>"

    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        body = text.strip()
        if body.startswith(self.TAG):
            body = body[len(self.TAG):].strip()
        if not body.startswith("{"):
            return text, []
        calls = []
        decoder = json.JSONDecoder()
        pos = 0
        while pos < len(body):
            try:
                obj, end = decoder.raw_decode(body, pos)
            except ValueError:
                return text, []
            call = _call_from_object(obj, "parameters")
            if call is None:
                return text, []
            calls.append(call)
            pos = end
            while pos < len(body) and body[pos] in " \t\r\n;":
                pos += 1
        return None, calls

    def content_end(self, text: str) -> int:
        stripped = text.lstrip()
        if not stripped:
            return 0
        if stripped[0] == "{" or stripped.startswith(self.TAG) or self.TAG.startswith(stripped):
            return 0                    # a tool call (or may be): hold everything back
        return len(text)


def _safe_prefix(text: str, marker: str) -> int:
    """len(text) minus a tail that could be the start of `marker`."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return len(text) - k
    return len(text)


TOOL_PARSERS = {"hermes": HermesToolParser, "llama3_json": Llama3JsonToolParser}
