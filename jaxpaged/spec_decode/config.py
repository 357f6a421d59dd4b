"""SpeculativeConfig: vLLM's `speculative_config` dict, checked once where it enters (EngineConfig).

    {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": a, "prompt_lookup_min": b}
    {"model": PATH_OR_BUILTIN, "num_speculative_tokens": k}          (method "draft_model")

Bad input is a ValueError naming the field as `speculative_config.<key>`; unknown keys and methods
are rejected (a typo must not silently turn speculation off).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

METHODS = ("ngram", "draft_model")
MAX_SPECULATIVE_TOKENS = 16     # rows per sequence in the verification step: 1 + k
DEFAULT_PROMPT_LOOKUP = 5       # vLLM's default n when neither prompt_lookup bound is given
_KEYS = ("method", "model", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min",
         "disable_by_batch_size")


@dataclass(frozen=True)
class SpeculativeConfig:
    """A parsed speculative_config (see the module docstring).

    disable_by_batch_size: a step speculates only while at most this many sequences are running
    (above it the batch already keeps the device busy, and verifying 1 + k rows per sequence would
    cost more than it saves); None: always.
    """
    method: str
    num_speculative_tokens: int
    prompt_lookup_max: int | None = None
    prompt_lookup_min: int | None = None
    model: str | None = None
    disable_by_batch_size: int | None = None

    @classmethod
    def parse(cls, value: Any) -> "SpeculativeConfig | None":
        """None / "" / a dict / a JSON object string / a SpeculativeConfig -> SpeculativeConfig or None."""
        if value is None or value == "" or value == {}:
            return None
        if isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"speculative_config: not valid JSON ({e})") from None
        if not isinstance(value, dict):
            raise ValueError(f"speculative_config: expected a JSON object, got {type(value).__name__}")
        unknown = sorted(set(value) - set(_KEYS))
        if unknown:
            raise ValueError(f"speculative_config.{unknown[0]}: unknown key; valid keys: {list(_KEYS)}")
        d = dict(value)
        method = d.get("method")
        if method is None:
            method = "draft_model" if d.get("model") is not None else None
        if method not in METHODS:
            raise ValueError(f"speculative_config.method: expected one of {list(METHODS)}, got {method!r}")
        k = _int(d, "num_speculative_tokens", required=True)
        if not 1 <= k <= MAX_SPECULATIVE_TOKENS:
            raise ValueError(f"speculative_config.num_speculative_tokens: must be in [1, {MAX_SPECULATIVE_TOKENS}], "
                             f"got {k}")
        limit = _int(d, "disable_by_batch_size")
        if limit is not None and limit < 1:
            raise ValueError(f"speculative_config.disable_by_batch_size: must be >= 1, got {limit}")
        if method == "ngram":
            if d.get("model") is not None:
                raise ValueError("speculative_config.model: the ngram method takes no model")
            hi, lo = _int(d, "prompt_lookup_max"), _int(d, "prompt_lookup_min")
            if hi is None and lo is None:
                hi = lo = DEFAULT_PROMPT_LOOKUP
            hi = lo if hi is None else hi
            lo = hi if lo is None else lo
            if lo < 1:
                raise ValueError(f"speculative_config.prompt_lookup_min: must be >= 1, got {lo}")
            if hi < lo:
                raise ValueError(f"speculative_config.prompt_lookup_max: must be >= prompt_lookup_min ({lo}), got {hi}")
            return cls("ngram", k, hi, lo, None, limit)
        model = d.get("model")
        if not isinstance(model, str) or not model:
            raise ValueError("speculative_config.model: the draft_model method needs a model name or path")
        for key in ("prompt_lookup_max", "prompt_lookup_min"):
            if d.get(key) is not None:
                raise ValueError(f"speculative_config.{key}: only for the ngram method")
        return cls("draft_model", k, None, None, model, limit)

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def _int(d: dict, key: str, required: bool = False) -> int | None:
    v = d.get(key)
    if v is None:
        if required:
            raise ValueError(f"speculative_config.{key}: required")
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"speculative_config.{key}: expected an integer, got {v!r}")
    return v
