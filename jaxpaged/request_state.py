"""The engine's state of a user request: one RequestState per request, one CompletionState per completion.

A user request (add_request) asks for n completions; each is one scheduler Sequence (sequence.py),
which owns the token ids. A CompletionState turns that sequence's sampled tokens into vLLM-shaped
output: it records logprobs and hands the token to a SequenceDetokenizer (detokenizer.py), which
decodes the new text incrementally and applies the stop rules (stop token ids / eos after min_tokens,
stop strings, max_tokens / max_model_len). RequestState holds what belongs to the request as a whole:
prompt, params, metrics, prompt logprobs.
"""
from __future__ import annotations

import time

from jaxpaged.detokenizer import SequenceDetokenizer, StopResult, TokenDecoder
from jaxpaged.outputs import CompletionOutput, RequestMetrics, RequestOutput, make_logprobs_entry
from jaxpaged.sampler import SamplingRow
from jaxpaged.sequence import Sequence, SequenceStatus


class RequestState:
    """A user request (SamplingParams): its prompt, params, metrics and its n completions.

    Completion i runs as Sequence `<request_id>` (n == 1) or `<request_id>#<i>`; with a seed, sample i
    uses seed + i (vLLM), else every sample would be identical.
    """

    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params, arrival: float,
                 *, tokenizer, eos_token_ids, max_model_len: int, decode_token: TokenDecoder):
        self.request_id, self.prompt, self.prompt_token_ids, self.params = request_id, prompt, prompt_token_ids, params
        self.metrics = RequestMetrics(arrival_time=arrival)
        self.completions: list[CompletionState] = []
        for i in range(params.n):
            seq_params = params if params.n == 1 or params.seed is None else params.clone()
            if seq_params is not params:
                seq_params.seed = params.seed + i
            seq = Sequence(request_id if params.n == 1 else f"{request_id}#{i}", prompt_token_ids, seq_params,
                           arrival, request_id=request_id, skip_prefix_cache=params.prompt_logprobs is not None)
            self.completions.append(CompletionState(seq, self, i, tokenizer, eos_token_ids=eos_token_ids,
                                                    max_model_len=max_model_len, decode_token=decode_token))
        self._by_seq = {c.seq.seq_id: c for c in self.completions}
        # prompt_logprobs: entry i scores prompt token i (entry 0 is None, as in vLLM); filled as the
        # prompt's chunks are computed (rows of position p score token p + 1)
        self.prompt_logprobs = [None] * len(prompt_token_ids) if params.prompt_logprobs is not None else None
        self._prompt_lp_done = 1

    def needs_prompt_logprobs(self, start: int) -> bool:
        """Whether a chunk starting at `start` computes positions still missing prompt logprobs."""
        return self.prompt_logprobs is not None and self._prompt_lp_done < len(self.prompt_token_ids) \
            and start < len(self.prompt_token_ids) - 1

    def record_prompt_logprobs(self, start: int, n: int, row: int, result, decode) -> None:
        k = self.params.prompt_logprobs
        ids = self.prompt_token_ids
        for p in range(start, min(start + n, len(ids) - 1)):
            r = row + p - start
            self.prompt_logprobs[p + 1] = make_logprobs_entry(
                ids[p + 1], result.prompt_logprob[r], result.prompt_rank[r],
                result.prompt_top_ids[r, :k], result.prompt_top_logprobs[r, :k], decode=decode)
            self._prompt_lp_done = max(self._prompt_lp_done, p + 2)

    def mark_scheduled(self, now: float) -> None:
        if self.metrics.first_scheduled_time is None:
            self.metrics.first_scheduled_time = now

    # ---- what the engine calls (beam_search.BeamSearchState has the same methods) -----------------
    def first_sequences(self) -> list[Sequence]:
        return [c.seq for c in self.completions]

    def sampling_row(self, seq: Sequence) -> SamplingRow:
        return self._by_seq[seq.seq_id].sampling_row()

    def on_sampled(self, seq: Sequence, result, row: int, scheduler) -> None:
        """Row `row` of the StepResult sampled a token for `seq`: append it, detokenize, stop checks."""
        scheduler.append_token(seq.seq_id, int(result.tokens[row]))
        reason = self._by_seq[seq.seq_id].on_token(result, row)
        if reason is not None:
            status = SequenceStatus.FINISHED_LENGTH if reason == "length" else SequenceStatus.FINISHED_STOPPED
            scheduler.finish_sequence(seq.seq_id, status)

    def on_scheduler_finished(self, seq: Sequence, scheduler) -> None:
        """The scheduler ended `seq` (more blocks than the whole pool): finish_reason "length"."""
        c = self._by_seq[seq.seq_id]
        if not c.finished:
            c.finish_length()

    def abort(self, scheduler) -> None:
        for c in self.completions:
            if not c.finished:
                c.abort()
                scheduler.finish_sequence(c.seq.seq_id, SequenceStatus.FINISHED_ABORTED)

    @property
    def finished(self) -> bool:
        return all(c.finished for c in self.completions)

    def to_output(self) -> RequestOutput:
        outs = [c.completion() for c in self.completions]
        cached = max((c.seq.num_cached_tokens for c in self.completions), default=0)
        lora = self.completions[0].seq.lora if self.completions else None
        return RequestOutput(request_id=self.request_id, prompt=self.prompt, prompt_token_ids=self.prompt_token_ids,
                             prompt_logprobs=self.prompt_logprobs, outputs=outs, finished=self.finished, metrics=self.metrics,
                             num_cached_tokens=cached, lora_request=lora.request if lora is not None else None)


class CompletionState:
    """Completion `index` of a request: its logprobs, text and finish state; the tokens are `seq`'s."""

    def __init__(self, seq: Sequence, request: RequestState, index: int, tokenizer, *, eos_token_ids,
                 max_model_len: int, decode_token: TokenDecoder):
        self.seq, self.request, self.index = seq, request, index
        self.params = p = seq.sampling_params
        self.out = SequenceDetokenizer(tokenizer, seq.prompt_token_ids, p, eos_token_ids, max_model_len)
        self.decode_token = decode_token
        self.logprobs = [] if p.logprobs is not None else None
        self.cumulative_logprob = 0.0
        self.aborted = False

    @property
    def finished(self) -> bool:
        return self.aborted or self.out.finished

    @property
    def finish_reason(self) -> str | None:
        return "abort" if self.aborted else self.out.finish_reason

    def finish_length(self) -> None:
        """Ended from outside the token stream (the KV pool cannot hold it): finish_reason "length"."""
        self.out._finish(StopResult("length"))
        self._mark_if_request_done()

    def abort(self) -> None:
        self.aborted = True
        self._mark_if_request_done()

    def _mark_if_request_done(self) -> None:
        if self.request.finished:
            self.request.metrics.finished_time = time.time()

    def sampling_row(self) -> SamplingRow:
        s = self.seq
        return SamplingRow(self.params, s.prompt_token_ids, s.output_token_ids, grammar=s.structured_output)

    def on_token(self, result, row: int) -> str | None:
        """Records the token sampled in `row` of a StepResult (already appended to the Sequence).

        Returns the finish reason ("stop" / "length") when the sequence ends, else None.
        """
        token = int(result.tokens[row])
        if self.seq.structured_output is not None:
            self.seq.structured_output.accept(token)
        now = time.time()
        m = self.request.metrics
        if m.first_token_time is None:
            m.first_token_time = now
        m.last_token_time = now
        self.cumulative_logprob += float(result.logprob[row])
        if self.logprobs is not None:
            n = self.params.logprobs
            top_ids = result.top_ids[row, :n] if n else ()
            top_lp = result.top_logprobs[row, :n] if n else ()
            self.logprobs.append(make_logprobs_entry(token, result.logprob[row], result.rank[row], top_ids, top_lp,
                                                     decode=self.decode_token))
        stop = self.out.append(token)
        grammar = self.seq.structured_output
        if stop is None and grammar is not None and grammar.is_terminated():
            # the grammar is complete and allows only eos, which ignore_eos does not stop on: end here
            stop = self.out._finish(StopResult("stop"))
        if stop is None:
            return None
        self._mark_if_request_done()
        return stop.finish_reason

    def completion(self) -> CompletionOutput:
        return CompletionOutput(index=self.index, text=self.out.stream_text(), token_ids=list(self.seq.output_token_ids),
                                cumulative_logprob=self.cumulative_logprob if self.logprobs is not None else None,
                                logprobs=list(self.logprobs) if self.logprobs is not None else None,
                                finish_reason=self.finish_reason,
                                stop_reason=self.out.stop_reason)
