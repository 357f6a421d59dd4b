"""Sequence: one token sequence the scheduler advances (tokens, how many have K/V in the cache, status).

Pure Python, no jax. The scheduler's unit of work. A user request (request_state.py) with n > 1
samples, and every beam of a beam search, is several Sequences; they share KV blocks through
the block manager.

The scheduler's one rule reads two numbers from a Sequence:

    num_tokens           = len(prompt_token_ids) + len(output_token_ids)
    num_computed_tokens  = tokens whose K/V are in the cache

and each step lets the second catch up with the first. A sequence is ready to sample in a
step when the step computes its last token (start + num_new_tokens == num_tokens).

A Sequence owns its token ids: `append_output_token` is the only way they grow (the
detokenizer and the output side read them, never copy them).
"""
from __future__ import annotations

import enum
import time
from typing import Any, Iterable


class SequenceStatus(enum.Enum):
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
    SequenceStatus.FINISHED_STOPPED: "stop",
    SequenceStatus.FINISHED_LENGTH: "length",
    SequenceStatus.FINISHED_ABORTED: "abort",
}


class Sequence:
    """One sequence. Compared by identity; `seq_id` is unique within a scheduler.

    Invariant: all_token_ids == prompt_token_ids + output_token_ids; the three lists change
    only through append_output_token (read them, never mutate them).
    """
    __slots__ = ("seq_id", "request_id", "prompt_token_ids", "output_token_ids", "_all_token_ids", "sampling_params",
                 "arrival_time", "num_computed_tokens", "status", "num_cached_tokens", "num_preemptions",
                 "skip_prefix_cache", "structured_output", "lora",
                 "spec_token_ids")

    def __init__(self, seq_id: str, prompt_token_ids: Iterable[int], sampling_params: Any = None,
                 arrival_time: float | None = None, *, request_id: str | None = None,
                 output_token_ids: Iterable[int] = (), skip_prefix_cache: bool = False):
        self.seq_id = seq_id
        self.request_id = seq_id if request_id is None else request_id   # the user request it serves
        self.prompt_token_ids: list[int] = list(prompt_token_ids)
        self.output_token_ids: list[int] = list(output_token_ids)
        self._all_token_ids: list[int] = self.prompt_token_ids + self.output_token_ids
        self.sampling_params = sampling_params    # SamplingParams; the scheduler never reads it
        self.arrival_time = time.time() if arrival_time is None else arrival_time
        self.num_computed_tokens = 0               # tokens whose K/V are in the cache
        self.status = SequenceStatus.WAITING
        self.num_cached_tokens = 0                 # tokens served from the prefix cache at the (last) admission
        self.num_preemptions = 0
        # no prefix-cache hits at admission: the sequence needs logits at every prompt position
        # (prompt_logprobs), which cached blocks cannot give
        self.skip_prefix_cache = skip_prefix_cache
        # structured output: this sequence's GrammarState; the scheduler leaves the sequence waiting
        # until its grammar has compiled (is_ready)
        self.structured_output: Any = None
        # LoRA: the sequence's adapter (lora.registry.LoadedLoRA) or None; its `key` picks the device
        # slot and roots the prefix-cache hash chain (two adapters never share K/V)
        self.lora: Any = None
        # speculative decoding: this step's draft tokens (not part of the sequence's tokens; the
        # scheduler computes them after its last token, the engine keeps the accepted ones)
        self.spec_token_ids: list[int] = []

    def __repr__(self) -> str:
        return (f"Sequence({self.seq_id!r}, prompt={len(self.prompt_token_ids)} tokens, "
                f"output={len(self.output_token_ids)} tokens, computed={self.num_computed_tokens}, "
                f"{self.status.name})")

    def continuation(self, seq_id: str, sampling_params: Any = None) -> "Sequence":
        """A new WAITING sequence with this one's prompt and output tokens (beam search forks)."""
        seq = Sequence(seq_id, self.prompt_token_ids, sampling_params if sampling_params is not None
                       else self.sampling_params, self.arrival_time, request_id=self.request_id,
                       output_token_ids=self.output_token_ids, skip_prefix_cache=self.skip_prefix_cache)
        seq.lora = self.lora
        return seq

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self._all_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        """prompt + output (a live list: read it, do not mutate it)."""
        return self._all_token_ids

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self._all_token_ids.append(token_id)

    def is_ready(self) -> bool:
        """Whether the sequence may be admitted (its grammar, if any, has compiled)."""
        return self.structured_output is None or self.structured_output.is_ready()

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished
