"""Request: one sequence's scheduling state (tokens, how many have K/V in the cache, status).

Pure Python, no jax. A request with n > 1 samples, and every beam of a beam search, is
several Requests (one per sequence); they share KV blocks through the block manager.

The scheduler's one rule reads two numbers from a Request:

    num_tokens           = len(prompt_token_ids) + len(output_token_ids)
    num_computed_tokens  = tokens whose K/V are in the cache

and each step lets the second catch up with the first. A request is ready to sample in a
step when the step computes its last token (start + num_new_tokens == num_tokens).
"""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "finished_stopped"
    FINISHED_LENGTH = "finished_length"
    FINISHED_ABORTED = "finished_aborted"

    @property
    def is_finished(self) -> bool:
        return self in _FINISH_REASON

    @property
    def finish_reason(self) -> str | None:
        """vLLM's finish_reason: "stop" | "length" | "abort", None while unfinished."""
        return _FINISH_REASON.get(self)


_FINISH_REASON = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


@dataclass(eq=False)
class Request:
    """One sequence. Compared by identity; `request_id` is unique within a scheduler."""
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: Any = None          # SamplingParams; the scheduler never reads it
    arrival_time: float = field(default_factory=time.time)
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0         # tokens whose K/V are in the cache
    status: RequestStatus = RequestStatus.WAITING
    num_cached_tokens: int = 0           # tokens served from the prefix cache at the (last) admission
    num_preemptions: int = 0
    # no prefix-cache hits at admission: the request needs logits at every prompt position
    # (prompt_logprobs), which cached blocks cannot give
    skip_prefix_cache: bool = False
    # prompt + output, kept in step with output_token_ids by append_output_token (and rebuilt
    # when someone appended to output_token_ids directly).
    _token_ids: list[int] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self):
        self.prompt_token_ids = list(self.prompt_token_ids)
        self.output_token_ids = list(self.output_token_ids)
        self._token_ids = self.prompt_token_ids + self.output_token_ids

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        """prompt + output (a live list: read it, do not mutate it)."""
        if len(self._token_ids) != self.num_tokens:
            self._token_ids = self.prompt_token_ids + self.output_token_ids
        return self._token_ids

    def append_output_token(self, token_id: int) -> None:
        out = self.output_token_ids
        out.append(token_id)
        toks = self._token_ids
        if len(toks) + 1 == len(self.prompt_token_ids) + len(out):
            toks.append(token_id)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished
