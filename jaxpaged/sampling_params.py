"""SamplingParams and BeamSearchParams: per-request generation settings with vLLM's names, meanings and defaults.

Construction validates everything that does not depend on the model (`__post_init__`); the engine calls
`validate(vocab_size=..., max_logprobs=..., max_model_len=...)` on admission for the rest. Every invalid value
raises `ValueError` whose message starts with the field name, e.g. "temperature must be >= 0, got -1".

Normalisations (as vLLM does):
  - `stop` given as one string becomes a one-element list; `stop_token_ids=None` becomes `[]`;
  - `top_k == -1` becomes 0 (both mean "off");
  - temperature below 1e-5 means greedy: top_p / top_k / min_p are reset to their neutral values.
"""
from __future__ import annotations

import copy
import enum
import numbers
from dataclasses import dataclass
from typing import Any

from jaxpaged.structured_output.params import StructuredOutputsParams

# Temperatures below this are treated as greedy (vLLM's _SAMPLING_EPS).
SAMPLING_EPS = 1e-5


class SamplingType(enum.IntEnum):
    GREEDY = 0
    RANDOM = 1          # unseeded: the row's uniforms come from the engine's numpy Generator
    RANDOM_SEED = 2     # seeded: uniforms = a hash of (seed, tokens generated so far) (sampler.seeded_uniforms)


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _check_int(name: str, value: Any, *, minimum: int | None = None, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not _is_int(value):
        raise ValueError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_number(name: str, value: Any) -> float:
    if not _is_number(value):
        raise ValueError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if value != value:  # NaN
        raise ValueError(f"{name} must not be NaN")
    return float(value)


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {type(value).__name__} {value!r}")


@dataclass
class SamplingParams:
    """How to sample one request. Field names, meanings and defaults follow vLLM."""
    n: int = 1
    best_of: int | None = None                # accepted for compatibility, ignored (as in vLLM v1)
    presence_penalty: float = 0.0             # [-2, 2]; subtracted once per token present in the output
    frequency_penalty: float = 0.0            # [-2, 2]; subtracted per occurrence in the output
    repetition_penalty: float = 1.0           # > 0; divides positive / multiplies negative logits of
                                              # tokens in prompt or output (1 = off)
    temperature: float = 1.0                  # >= 0; 0 = greedy
    top_p: float = 1.0                        # (0, 1]
    top_k: int = 0                            # 0 or -1 = off
    min_p: float = 0.0                        # [0, 1]; keep tokens with p >= min_p * max p
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16               # None = up to max_model_len
    min_tokens: int = 0                       # eos / stop_token_ids are banned before this many tokens
    logprobs: int | None = None               # top-N logprobs per generated token (0 = the sampled token only)
    prompt_logprobs: int | None = None
    detokenize: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: dict[int, float] | None = None  # token id -> bias in [-100, 100], added to the logits
    structured_outputs: StructuredOutputsParams | None = None  # JSON schema / regex / choice / grammar

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        elif self.stop is None:
            self.stop = []
        elif isinstance(self.stop, tuple):
            self.stop = list(self.stop)
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        elif isinstance(self.stop_token_ids, tuple):
            self.stop_token_ids = list(self.stop_token_ids)
        if _is_int(self.top_k) and self.top_k == -1:
            self.top_k = 0
        self._verify()
        if self.temperature < SAMPLING_EPS:
            # greedy: the filters cannot change the argmax
            self.top_p, self.top_k, self.min_p = 1.0, 0, 0.0

    # ---- validation -------------------------------------------------------------------------------
    def _verify(self) -> None:
        _check_int("n", self.n, minimum=1)
        _check_int("best_of", self.best_of, minimum=1, optional=True)
        for name in ("presence_penalty", "frequency_penalty"):
            v = _check_number(name, getattr(self, name))
            if not -2.0 <= v <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {v}")
        rp = _check_number("repetition_penalty", self.repetition_penalty)
        if not 0.0 < rp < float("inf"):
            raise ValueError(f"repetition_penalty must be > 0 and finite, got {rp}")
        t = _check_number("temperature", self.temperature)
        if t < 0.0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if t == float("inf"):
            raise ValueError("temperature must be finite, got inf")
        p = _check_number("top_p", self.top_p)
        if not 0.0 < p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not _is_int(self.top_k):
            raise ValueError(f"top_k must be an int, got {type(self.top_k).__name__} {self.top_k!r}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be 0 or -1 (disabled) or >= 1, got {self.top_k}")
        mp = _check_number("min_p", self.min_p)
        if not 0.0 <= mp <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        _check_int("seed", self.seed, optional=True)
        _check_int("max_tokens", self.max_tokens, minimum=1, optional=True)
        _check_int("min_tokens", self.min_tokens, minimum=0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens must be <= max_tokens={self.max_tokens}, got {self.min_tokens}")
        _check_int("logprobs", self.logprobs, minimum=0, optional=True)
        _check_int("prompt_logprobs", self.prompt_logprobs, minimum=0, optional=True)
        for name in ("ignore_eos", "detokenize", "skip_special_tokens", "spaces_between_special_tokens",
                     "include_stop_str_in_output"):
            _check_bool(name, getattr(self, name))
        if not isinstance(self.stop, list) or not all(isinstance(s, str) for s in self.stop):
            raise ValueError(f"stop must be a str or a list of str, got {self.stop!r}")
        if any(s == "" for s in self.stop):
            raise ValueError("stop must not contain an empty string")
        if self.stop and not self.detokenize:
            raise ValueError("stop strings are only supported when detokenize is True")
        if not isinstance(self.stop_token_ids, list) or not all(_is_int(i) for i in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be a list of int, got {self.stop_token_ids!r}")
        if any(i < 0 for i in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be >= 0, got {self.stop_token_ids}")
        self._verify_logit_bias()
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise ValueError(f"structured_outputs must be a StructuredOutputsParams, got "
                             f"{type(self.structured_outputs).__name__}")

    def _verify_logit_bias(self) -> None:
        if self.logit_bias is None:
            return
        if not isinstance(self.logit_bias, dict):
            raise ValueError(f"logit_bias must be a dict of token id -> bias, got {type(self.logit_bias).__name__}")
        clean = {}
        for k, v in self.logit_bias.items():
            # OpenAI clients send the ids as JSON object keys, i.e. strings
            if isinstance(k, str) and k.strip().lstrip("-").isdigit():
                k = int(k)
            if not _is_int(k) or k < 0:
                raise ValueError(f"logit_bias keys must be token ids (int >= 0), got {k!r}")
            b = _check_number("logit_bias", v)
            if not -100.0 <= b <= 100.0:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {v} for token {k}")
            clean[int(k)] = b
        self.logit_bias = clean

    def validate(self, vocab_size: int | None = None, max_logprobs: int = 20,
                 max_model_len: int | None = None) -> "SamplingParams":
        """Model-dependent checks, called by the engine on admission. Returns self."""
        self._verify()
        if self.logprobs is not None and self.logprobs > max_logprobs:
            raise ValueError(f"logprobs must be <= max_logprobs={max_logprobs}, got {self.logprobs}")
        if self.prompt_logprobs is not None and self.prompt_logprobs > max_logprobs:
            raise ValueError(f"prompt_logprobs must be <= max_logprobs={max_logprobs}, "
                             f"got {self.prompt_logprobs}")
        if vocab_size is not None:
            bad = [i for i in self.stop_token_ids if i >= vocab_size]
            if bad:
                raise ValueError(f"stop_token_ids must be < vocab_size={vocab_size}, got {bad}")
            bad = sorted(i for i in (self.logit_bias or {}) if i >= vocab_size)
            if bad:
                raise ValueError(f"logit_bias token ids must be < vocab_size={vocab_size}, got {bad[:8]}")
        if self.structured_outputs is not None:
            self.structured_outputs.validate()
        if max_model_len is not None and self.max_tokens is not None and self.max_tokens > max_model_len:
            raise ValueError(f"max_tokens must be <= max_model_len={max_model_len}, got {self.max_tokens}")
        return self

    # ---- derived -----------------------------------------------------------------------------------
    @property
    def sampling_type(self) -> SamplingType:
        if self.is_greedy:
            return SamplingType.GREEDY
        return SamplingType.RANDOM if self.seed is None else SamplingType.RANDOM_SEED

    @property
    def is_greedy(self) -> bool:
        """Argmax of the penalized logits: temperature ~0, or top_k == 1 (identical by construction)."""
        return self.temperature < SAMPLING_EPS or self.top_k == 1

    @property
    def uses_penalties(self) -> bool:
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.repetition_penalty != 1.0)

    @property
    def output_text_buffer_length(self) -> int:
        """Characters of the newest text a stream must hold back: they may start a stop string."""
        if self.stop and not self.include_stop_str_in_output:
            return max(len(s) for s in self.stop) - 1
        return 0

    def all_stop_token_ids(self, eos_token_ids=()) -> set[int]:
        """Token ids that end the sequence: stop_token_ids, plus eos unless ignore_eos."""
        ids = set(self.stop_token_ids)
        if not self.ignore_eos:
            ids.update(eos_token_ids)
        return ids

    def clone(self) -> "SamplingParams":
        return copy.deepcopy(self)


@dataclass
class BeamSearchParams:
    """Beam search settings (vLLM's names). Scores are cum_logprob / len**length_penalty."""
    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False
    logit_bias: dict[int, float] | None = None  # token id -> bias in [-100, 100], added to the logits
    structured_outputs: StructuredOutputsParams | None = None  # JSON schema / regex / choice / grammar

    def __post_init__(self):
        _check_int("beam_width", self.beam_width, minimum=1)
        _check_int("max_tokens", self.max_tokens, minimum=1)
        _check_bool("ignore_eos", self.ignore_eos)
        _check_bool("include_stop_str_in_output", self.include_stop_str_in_output)
        t = _check_number("temperature", self.temperature)
        if t < 0.0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        lp = _check_number("length_penalty", self.length_penalty)
        if lp in (float("inf"), float("-inf")):
            raise ValueError(f"length_penalty must be finite, got {lp}")

    def clone(self) -> "BeamSearchParams":
        return copy.deepcopy(self)
