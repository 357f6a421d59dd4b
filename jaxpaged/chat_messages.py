"""Chat messages checked as OpenAI's Chat Completions API checks them, before any chat template sees them.

One rule set for the offline API (`LLM.chat`) and the server (`/v1/chat/completions`, `/tokenize`):

| role                  | content                                   | also                                 |
|-----------------------|-------------------------------------------|--------------------------------------|
| system, developer     | required: a string or text parts          | name (string) optional               |
| user                  | required: a string or text parts          | name (string) optional               |
| assistant             | required unless tool_calls are given      | tool_calls (list), name optional     |
| tool                  | required: a string or text parts          | tool_call_id (string) required       |

Text parts are `{"type": "text", "text": "..."}`; other part types (images, audio, files) are refused
because no model here reads them. `normalize_messages` returns plain dicts whose content is a string
(parts joined), ready for `tokenizer.apply_chat_template`. Errors are `ChatMessageError` (a ValueError)
whose message starts with the offending field, e.g. `messages[1].role: ...`, and whose `param` is that
field.
"""
from __future__ import annotations

from typing import Any

ROLES = ("system", "developer", "user", "assistant", "tool")


class ChatMessageError(ValueError):
    """A message that OpenAI's API would refuse; `param` names the field ("messages[2].content")."""

    def __init__(self, param: str, problem: str):
        super().__init__(f"{param}: {problem}")
        self.param = param


def normalize_messages(messages: Any) -> list[dict]:
    """Checks a conversation; returns copies of its messages with content as one string (None kept for
    an assistant message that only carries tool_calls)."""
    if not isinstance(messages, (list, tuple)):
        raise ChatMessageError("messages", f"expected a list of messages, got {type(messages).__name__}")
    if not messages:
        raise ChatMessageError("messages", "must not be empty")
    return [normalize_message(i, m) for i, m in enumerate(messages)]


def normalize_message(i: int, message: Any) -> dict:
    """messages[i] checked; a copy with content as one string."""
    where = f"messages[{i}]"
    if not isinstance(message, dict):
        raise ChatMessageError(where, f"expected an object with 'role' and 'content', got {type(message).__name__}")
    role = message.get("role")
    if not isinstance(role, str) or role not in ROLES:
        shown = "missing" if role is None else repr(role)
        raise ChatMessageError(f"{where}.role", f"{shown} is not a valid role; expected one of {list(ROLES)}")
    name = message.get("name")
    if name is not None and not isinstance(name, str):
        raise ChatMessageError(f"{where}.name", "must be a string")
    tool_calls = message.get("tool_calls")
    if tool_calls is not None and role != "assistant":
        raise ChatMessageError(f"{where}.tool_calls", f"only assistant messages carry tool_calls, not {role!r} ones")
    if tool_calls is not None and not isinstance(tool_calls, list):
        raise ChatMessageError(f"{where}.tool_calls", "must be a list")
    if role == "tool" and not isinstance(message.get("tool_call_id"), str):
        raise ChatMessageError(f"{where}.tool_call_id", "a tool message needs the string id of the tool call it answers")
    content = message.get("content")
    if content is None:
        if role == "assistant" and tool_calls:
            return dict(message)
        needs = "is required unless tool_calls are given" if role == "assistant" else f"is required for role {role!r}"
        raise ChatMessageError(f"{where}.content", needs)
    return {**message, "content": _text(f"{where}.content", content)}


def _text(where: str, content: Any) -> str:
    """String content as is; a list of text parts joined."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ChatMessageError(where, f"expected a string or a list of content parts, got {type(content).__name__}")
    texts = []
    for k, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            shown = repr(kind) if kind is not None else type(part).__name__
            raise ChatMessageError(f"{where}[{k}]", f"only text parts ({{'type': 'text', 'text': '...'}}) are "
                                                    f"supported, got {shown}")
        texts.append(part["text"])
    return "".join(texts)
