"""Engine-side output state: one SequenceState per generated sequence, one RequestGroup per user request.

A SequenceState turns sampled tokens into vLLM-shaped output: it appends the token, decodes the new
text incrementally, records logprobs, and applies the stop rules in vLLM's order — stop token ids and
eos (after min_tokens; the token stays in token_ids, its text is not added), stop strings (the text is
cut before the stop string unless include_stop_str_in_output), then max_tokens / max_model_len.
"""
from __future__ import annotations

import time

from jaxpaged.detokenizer import IncrementalDetokenizer
from jaxpaged.outputs import CompletionOutput, RequestMetrics, RequestOutput, make_logprobs_entry
from jaxpaged.request import Request
from jaxpaged.sampler import SamplingRow


class RequestGroup:
    """A user request: its prompt, params, metrics and its n sequences."""

    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params, arrival: float):
        self.request_id, self.prompt, self.prompt_token_ids, self.params = request_id, prompt, prompt_token_ids, params
        self.seqs: list[SequenceState] = []
        self.metrics = RequestMetrics(arrival_time=arrival)

    def mark_scheduled(self, now: float) -> None:
        if self.metrics.first_scheduled_time is None:
            self.metrics.first_scheduled_time = now

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.seqs)

    def to_output(self) -> RequestOutput:
        outs = [s.completion() for s in self.seqs]
        cached = max((s.request.num_cached_tokens for s in self.seqs), default=0)
        return RequestOutput(request_id=self.request_id, prompt=self.prompt, prompt_token_ids=self.prompt_token_ids,
                             prompt_logprobs=None, outputs=outs, finished=self.finished, metrics=self.metrics,
                             num_cached_tokens=cached)


class SequenceState:
    def __init__(self, request: Request, group: RequestGroup, index: int, tokenizer, *, max_tokens: int):
        self.request, self.group, self.index, self.tokenizer = request, group, index, tokenizer
        p = request.sampling_params
        self.params, self.max_tokens = p, max_tokens
        self.detok = IncrementalDetokenizer(tokenizer, request.prompt_token_ids,
                                            skip_special_tokens=p.skip_special_tokens,
                                            spaces_between_special_tokens=p.spaces_between_special_tokens)
        self.text = ""
        self.logprobs = [] if p.logprobs is not None else None
        self.cumulative_logprob = 0.0
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def finish(self, reason: str, stop_reason=None) -> None:
        self.finish_reason, self.stop_reason = reason, stop_reason
        if self.group.finished:
            self.group.metrics.finished_time = time.time()

    def sampling_row(self) -> SamplingRow:
        r = self.request
        return SamplingRow(self.params, r.prompt_token_ids, r.output_token_ids)

    def on_token(self, result, row: int, max_model_len: int, eos_token_ids) -> str | None:
        """Records the token sampled in `row` of a StepResult (already appended to the Request).

        Returns the finish reason ("stop" / "length") when the sequence ends, else None.
        """
        token = int(result.tokens[row])
        now = time.time()
        m = self.group.metrics
        if m.first_token_time is None:
            m.first_token_time = now
        m.last_token_time = now
        self.cumulative_logprob += float(result.logprob[row])
        if self.logprobs is not None:
            n = self.params.logprobs
            top_ids = result.top_ids[row, :n] if n else ()
            top_lp = result.top_logprobs[row, :n] if n else ()
            self.logprobs.append(make_logprobs_entry(token, result.logprob[row], result.rank[row], top_ids, top_lp,
                                                     decode=self._decode_one))
        reason = self._check_stop(token, max_model_len, eos_token_ids)
        if reason is not None:
            self.finish(*reason)
            return reason[0]
        return None

    def _decode_one(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def _check_stop(self, token: int, max_model_len: int, eos_token_ids):
        p, req = self.params, self.request
        n_out = req.num_output_tokens
        past_min = n_out >= p.min_tokens
        if past_min and token in p.stop_token_ids:
            return "stop", token
        if past_min and not p.ignore_eos and token in eos_token_ids:
            return "stop", None
        if p.detokenize:
            delta = self.detok.append([token])
            start = max(0, len(self.text) - max((len(s) for s in p.stop), default=0) + 1)
            self.text += delta
            if p.stop and past_min and delta:
                hit = _find_stop(self.text, start, p.stop)
                if hit is not None:
                    pos, stop = hit
                    self.text = self.text[: pos + len(stop)] if p.include_stop_str_in_output else self.text[:pos]
                    return "stop", stop
        if n_out >= self.max_tokens or req.num_tokens >= max_model_len:
            return "length", None
        return None

    def completion(self) -> CompletionOutput:
        r = self.request
        return CompletionOutput(index=self.index, text=self.text, token_ids=list(r.output_token_ids),
                                cumulative_logprob=self.cumulative_logprob if self.logprobs is not None else None,
                                logprobs=self.logprobs, finish_reason=self.finish_reason,
                                stop_reason=self.stop_reason)


def _find_stop(text: str, start: int, stops) -> tuple[int, str] | None:
    """Earliest stop string occurring in text at or after `start` (stop strings may span tokens)."""
    best = None
    for s in stops:
        i = text.find(s, start)
        if i >= 0 and (best is None or i < best[0]):
            best = (i, s)
    return best
