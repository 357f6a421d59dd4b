"""What the engine returns: vLLM-shaped RequestOutput / CompletionOutput / Logprob, beam search outputs, metrics.

Logprobs follow vLLM's shape: `CompletionOutput.logprobs` is a list with one entry per generated token, each
a dict {token_id: Logprob} holding the sampled token (first) and the top-N tokens (rank 1..N, best first);
`RequestOutput.prompt_logprobs` is a list with one entry per prompt token, the first being None.
`make_logprobs_entry` turns one row of the sampler's output into such a dict, `make_prompt_logprobs` a
prompt's rows into the prompt_logprobs list.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

LogprobsEntry = dict  # {token_id: Logprob}
SampleLogprobs = list  # list[LogprobsEntry], one per generated token
PromptLogprobs = list  # list[LogprobsEntry | None], one per prompt token (the first is None)


@dataclass
class Logprob:
    """Log probability of one token under the model's (raw) distribution; rank is 1-based."""
    logprob: float
    rank: Optional[int] = None
    decoded_token: Optional[str] = None


def make_logprobs_entry(token_id: int, logprob: float, rank: int, top_ids: Sequence[int] = (),
                        top_logprobs: Sequence[float] = (),
                        decode: Optional[Callable[[int], str]] = None) -> LogprobsEntry:
    """One generated position: the sampled token first, then the top-N (rank i+1). A sampled token that is
    also in the top-N appears once. `decode(token_id)` fills Logprob.decoded_token when given."""
    def dec(t):
        return decode(t) if decode is not None else None

    entry = {int(token_id): Logprob(float(logprob), int(rank), dec(int(token_id)))}
    for i, (tid, lp) in enumerate(zip(top_ids, top_logprobs)):
        tid = int(tid)
        if tid not in entry:
            entry[tid] = Logprob(float(lp), i + 1, dec(tid))
    return entry


def make_prompt_logprobs(prompt_token_ids: Sequence[int], logprob: Sequence[float], rank: Sequence[int],
                         top_ids=None, top_logprobs=None,
                         decode: Optional[Callable[[int], str]] = None) -> PromptLogprobs:
    """vLLM's prompt_logprobs: [None] for the first prompt token, then one entry per later token i built
    from row i-1 of the arrays (the logits at position i-1 predict token i), e.g. the output of
    sampler.token_logprobs(logits[:-1], prompt_ids[1:], N)."""
    out: PromptLogprobs = [None]
    for i, tok in enumerate(prompt_token_ids[1:]):
        ids = top_ids[i] if top_ids is not None else ()
        lps = top_logprobs[i] if top_logprobs is not None else ()
        out.append(make_logprobs_entry(tok, logprob[i], rank[i], ids, lps, decode))
    return out


@dataclass
class CompletionOutput:
    """One generated sequence of a request (index i of its n)."""
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: Optional[float]
    logprobs: Optional[SampleLogprobs]
    finish_reason: Optional[str] = None        # "stop" | "length" | "abort" | None (still running)
    stop_reason: int | str | None = None        # the stop token id or stop string that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None

    def __repr__(self) -> str:
        return (f"CompletionOutput(index={self.index}, text={self.text!r}, token_ids={self.token_ids}, "
                f"cumulative_logprob={self.cumulative_logprob}, logprobs={self.logprobs}, "
                f"finish_reason={self.finish_reason}, stop_reason={self.stop_reason})")


@dataclass
class RequestMetrics:
    """Wall-clock times (time.time()) of one request's milestones; None until reached."""
    arrival_time: float
    first_scheduled_time: Optional[float] = None
    first_token_time: Optional[float] = None
    last_token_time: Optional[float] = None
    finished_time: Optional[float] = None
    # speculative decoding (0 without it): verifications of this request's drafts, draft tokens, accepted ones
    spec_num_drafts: int = 0
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0

    @property
    def spec_acceptance_rate(self) -> Optional[float]:
        """Accepted / proposed draft tokens; None when nothing was drafted."""
        return self.spec_num_accepted_tokens / self.spec_num_draft_tokens if self.spec_num_draft_tokens else None

    @property
    def spec_mean_acceptance_length(self) -> Optional[float]:
        """Tokens emitted per verification step, the target's own token included (1 .. k + 1)."""
        return 1.0 + self.spec_num_accepted_tokens / self.spec_num_drafts if self.spec_num_drafts else None

    @property
    def time_to_first_token(self) -> Optional[float]:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def time_in_queue(self) -> Optional[float]:
        return None if self.first_scheduled_time is None else self.first_scheduled_time - self.arrival_time


@dataclass
class RequestOutput:
    """Everything about one request so far (text cumulative), as returned by LLM.generate / engine.step."""
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    prompt_logprobs: Optional[PromptLogprobs]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: Optional[RequestMetrics] = None
    num_cached_tokens: int = 0
    lora_request: Optional[Any] = None       # the LoRARequest it ran with (None: the base model)

    def __repr__(self) -> str:
        return (f"RequestOutput(request_id={self.request_id}, prompt={self.prompt!r}, "
                f"prompt_token_ids={self.prompt_token_ids}, prompt_logprobs={self.prompt_logprobs}, "
                f"outputs={self.outputs}, finished={self.finished}, metrics={self.metrics}, "
                f"num_cached_tokens={self.num_cached_tokens})")


@dataclass
class BeamSearchSequence:
    """One beam. vLLM's convention: `tokens` are prompt + generated ids and `text` is their decoding."""
    tokens: list[int]
    text: Optional[str] = None
    cum_logprob: float = 0.0
    logprobs: list = field(default_factory=list)
    finish_reason: Optional[str] = None
    stop_reason: int | str | None = None


@dataclass
class BeamSearchOutput:
    """The finished beams of one prompt, best first."""
    sequences: list[BeamSearchSequence]
