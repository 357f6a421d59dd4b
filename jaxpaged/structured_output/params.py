"""StructuredOutputsParams: what a request's output must match (vLLM's `StructuredOutputsParams`).

Exactly one of `json` (a JSON schema, dict or JSON text), `regex`, `choice` (a list of strings),
`grammar` (Lark, or llama.cpp GBNF/EBNF) or `json_object=True` (any JSON object) is set.
Construction checks the shape of the value; `validate()` (called on admission, cheap: no
tokenizer) parses the schema / regex / grammar and raises a ValueError whose message starts with
"structured_outputs" and names the sub-field, e.g. "structured_outputs.regex: invalid regex ...".
"""
from __future__ import annotations

import json as jsonlib
from dataclasses import dataclass
from typing import Any

KINDS = ("json", "regex", "choice", "grammar", "json_object")
ANY_JSON_OBJECT = {"type": "object"}
WHITESPACE = r"[\x20\x0A\x0D\x09]{0,4}"   # JSON whitespace allowed between tokens (at most 4 characters)


def _fail(field: str, message: str):
    raise ValueError(f"structured_outputs.{field}: {message}")


@dataclass
class StructuredOutputsParams:
    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    # vLLM's option: no free whitespace between JSON tokens (compact output)
    disable_any_whitespace: bool = False

    def __post_init__(self):
        given = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError("structured_outputs: exactly one of json, regex, choice, grammar, json_object "
                             f"must be set, got {given or 'none'}")
        if self.json is not None:
            if isinstance(self.json, str):
                try:
                    self.json = jsonlib.loads(self.json)
                except ValueError as exc:
                    _fail("json", f"is not valid JSON text: {exc}")
            if not isinstance(self.json, (dict, bool)):
                _fail("json", f"a JSON schema must be an object, got {type(self.json).__name__}")
        if self.regex is not None and not isinstance(self.regex, str):
            _fail("regex", f"must be a str, got {type(self.regex).__name__}")
        if self.choice is not None:
            if isinstance(self.choice, tuple):
                self.choice = list(self.choice)
            if not isinstance(self.choice, list) or not self.choice or \
                    not all(isinstance(c, str) for c in self.choice):
                _fail("choice", f"must be a non-empty list of str, got {self.choice!r}")
        if self.grammar is not None and (not isinstance(self.grammar, str) or not self.grammar.strip()):
            _fail("grammar", f"must be a non-empty str, got {self.grammar!r}")
        if self.json_object is not None and not isinstance(self.json_object, bool):
            _fail("json_object", f"must be a bool, got {type(self.json_object).__name__}")
        if not isinstance(self.disable_any_whitespace, bool):
            _fail("disable_any_whitespace", f"must be a bool, got {type(self.disable_any_whitespace).__name__}")

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    def key(self) -> tuple:
        """Cache key of the compiled grammar: equal specs share one compile."""
        value = getattr(self, self.kind)
        if isinstance(value, (dict, list, bool)):
            value = jsonlib.dumps(value, sort_keys=True)
        return self.kind, value, self.disable_any_whitespace

    def to_grammar(self) -> str:
        """The llguidance grammar text (raises ValueError naming the sub-field when it cannot be built)."""
        from llguidance import LLMatcher
        from llguidance.gbnf_to_lark import any_to_lark

        kind = self.kind
        if kind in ("json", "json_object"):
            schema = ANY_JSON_OBJECT if kind == "json_object" else self.json
            # whitespace between tokens: short runs only (a small model can otherwise loop on
            # newlines until max_tokens); none at all with disable_any_whitespace
            options = ({"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
                       if self.disable_any_whitespace else
                       {"whitespace_flexible": True, "whitespace_pattern": WHITESPACE})
            try:
                return LLMatcher.grammar_from_json_schema(schema, defaults=options)
            except ValueError as exc:
                _fail(kind, f"invalid JSON schema: {exc}")
        if kind == "regex":
            return LLMatcher.grammar_from_regex(self.regex)
        if kind == "choice":
            # a Lark alternation of string literals (JSON string escaping is Lark's)
            return LLMatcher.grammar_from_lark("start: " + " | ".join(jsonlib.dumps(c) for c in self.choice))
        try:
            return LLMatcher.grammar_from_lark(any_to_lark(self.grammar))
        except Exception as exc:  # noqa: BLE001 - the converter raises plain exceptions for bad GBNF
            _fail("grammar", f"could not parse the grammar: {exc}")

    def validate(self) -> str:
        """Parses the spec without a tokenizer (milliseconds); returns the grammar text."""
        from llguidance import LLMatcher

        grammar = self.to_grammar()
        error = LLMatcher.validate_grammar(grammar)
        if error and not error.startswith("WARNING"):
            _fail(self.kind, f"invalid {_WHAT[self.kind]}: {error.strip()}")
        return grammar


_WHAT = {"json": "JSON schema", "json_object": "JSON schema", "regex": "regex", "choice": "choice list",
         "grammar": "grammar"}
