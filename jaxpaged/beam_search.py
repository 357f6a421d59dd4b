"""Beam search as a request type of the engine: every beam is a scheduler Sequence, beams share KV blocks.

vLLM's algorithm (`LLM.beam_search`), run by the engine's own step instead of one generate() call
per token: `LLMEngine.add_request(id, prompt, BeamSearchParams(...))` makes a BeamSearchState (the
engine's state of that request, like request_state.RequestState for sampling) and every
`engine.step()` advances it together with whatever else is running. W = beam_width:

    the request starts as ONE Sequence: the prompt is computed once
    each step: a sampled row of one of its beams (greedy rows asking for 2W logprobs) gives that
          beam its candidates (on_sampled)
    once its live beams all have candidates the request takes one round:
      candidates   per live beam its top 2W next tokens (plus the sampled one, which only
                   differs when temperature > 0), cum_logprob = beam's + the token's raw logprob
      eos          candidates (unless ignore_eos) go to the finished list (finish_reason "stop")
      the rest     the best W by cum_logprob become the next live beams
      KV sharing   a parent none of whose candidates survived is finished (blocks freed) first;
                   a parent with k survivors keeps the first token itself (append_token) and
                   fork_sequence()s k-1 children that share all its blocks (refcount + 1); the
                   first write into a shared, partly filled block is a copy-on-write that the
                   scheduler lists and the runner performs (full blocks are never copied).
      last round   (max_tokens generated, or max_model_len reached) the survivors are not
                   computed further: they join the finished list (finish_reason "length")
    result: the finished list ranked by vLLM's score, best W first.

Score (vLLM's get_beam_search_score): cum_logprob / L ** length_penalty, where L counts prompt
AND generated tokens, minus one when the beam ended with eos. (vLLM subtracts one for any
trailing eos token; here only for beams that eos finished, so with ignore_eos every beam of an
instance has the same L and the ranking is by cum_logprob.)

Stopping rules, vLLM vs transformers' `generate(num_beams=W)`:
  * same: both keep the best W non-eos candidates per step by cum_logprob, from raw log_softmax
    (temperature 0, no other processors); a beam's top 2W always hold its share of them. With
    eos unable to finish a beam (ignore_eos here, eos_token_id=None there) both return the best
    W of the last step's candidates, so sequences and cum_logprobs are equal (tested);
    `early_stopping` and `length_penalty` do not change that result.
  * with eos: transformers keeps at most W finished hypotheses and only admits eos candidates
    ranked in the top W of the step's 2W; here every eos candidate among each beam's top 2W is
    kept (as vLLM). transformers scores a finished hypothesis by generated length (eos included),
    vLLM/here by prompt + generated length (eos excluded). transformers stops early
    (early_stopping=True: once W hypotheses are finished; False/"never": when its heuristic says
    no live beam can beat the worst finished one); vLLM/here always run max_tokens rounds while
    any beam is live. So with eos, results differ whenever an eos candidate outside a step's
    top W (or one found after transformers stopped) scores better: on the tiny test llama with
    prompts where eos is often the top token, 2 of 8 (prompt, W in 2/4, length_penalty in 0/1)
    cases matched, for every early_stopping.
  * `text` is tokenizer.decode(tokens) as vLLM's LLM.beam_search does (prompt included, special
    tokens kept), except that a finishing eos is left out unless include_stop_str_in_output.
  * beams also stop at max_model_len (finish_reason "length"), where vLLM's loop would fail.

Sharing the engine: beams are ordinary sequences to the scheduler, so a beam search runs while
other requests are in flight (the batch mixes both). The engine starts beam searches while the
beam_width seats of each fit max_num_seqs (LLMEngine._start_waiting_beams; one always runs); a fork
that still finds no free seat waits at the front of the queue and recomputes (the prefix cache
serves its full blocks). Aborting the request
(or an error in LLM.beam_search) finishes every beam, so no block is left in use.

KV pool pressure: the scheduler may preempt beams (they recompute). If nothing can be scheduled
because beams that already have their candidates hold the blocks a waiting sibling needs, the
engine asks the beam searches to release those blocks (release_waiting_parents: finish_sequence)
and their children are re-added as new sequences that recompute.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from jaxpaged.detokenizer import TokenDecoder
from jaxpaged.outputs import (BeamSearchOutput, BeamSearchSequence, CompletionOutput, Logprob, RequestMetrics,
                              RequestOutput)
from jaxpaged.sampler import SamplingRow
from jaxpaged.sampling_params import BeamSearchParams, SamplingParams
from jaxpaged.sequence import Sequence, SequenceStatus


def beam_search_score(num_tokens: int, cum_logprob: float, ended_by_eos: bool, length_penalty: float) -> float:
    """vLLM's score: cum_logprob / L ** length_penalty, L = prompt + generated tokens (eos excluded)."""
    length = num_tokens - 1 if ended_by_eos else num_tokens
    return cum_logprob / (length ** length_penalty)


@dataclass
class _Beam:
    """One live beam. `seq_id` names its scheduler Sequence; `tokens` are prompt + generated."""
    seq_id: str
    tokens: list[int]
    cum_logprob: float = 0.0
    logprobs: list = field(default_factory=list)      # per generated token: {token_id: Logprob}
    candidates: list | None = None                     # [(token, logprob, rank)] of this round
    attached: bool = True                              # its Sequence is in the scheduler


class BeamSearchState:
    """The engine's state of one beam-search request (one prompt)."""

    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: BeamSearchParams,
                 arrival: float, *, eos_token_ids, max_model_len: int, decode_token: TokenDecoder, tokenizer):
        self.request_id, self.prompt, self.prompt_token_ids = request_id, prompt, list(prompt_token_ids)
        self.params, self.width = params, params.beam_width
        self.metrics = RequestMetrics(arrival_time=arrival)
        self.rounds = min(params.max_tokens, max_model_len - len(prompt_token_ids))   # tokens each beam may generate
        self.eos = frozenset() if params.ignore_eos else frozenset(int(t) for t in eos_token_ids)
        self.decode_token, self.tokenizer = decode_token, tokenizer
        # the per-step row of every beam: greedy (or the requested temperature), 2W logprobs
        self.row_params = SamplingParams(temperature=params.temperature, max_tokens=1, logprobs=2 * self.width,
                                         ignore_eos=True)
        self.beams: list[_Beam] = []
        self.finished_beams: list[BeamSearchSequence] = []
        self.done = False
        self._next_beam = 0
        self.lora = None        # LoRA: the adapter (lora.registry.LoadedLoRA) every beam's Sequence runs with

    # ---- what the engine calls --------------------------------------------------------------------
    def first_sequences(self) -> list[Sequence]:
        beam = _Beam(self._new_id(), list(self.prompt_token_ids))
        self.beams.append(beam)
        seq = Sequence(beam.seq_id, self.prompt_token_ids, self.row_params, self.metrics.arrival_time,
                       request_id=self.request_id)
        seq.lora = self.lora
        return [seq]

    @property
    def finished(self) -> bool:
        return self.done

    def sampling_row(self, seq: Sequence) -> SamplingRow:
        return SamplingRow(self.row_params, seq.prompt_token_ids, seq.output_token_ids)

    def needs_prompt_logprobs(self, start: int) -> bool:
        return False

    def mark_scheduled(self, now: float) -> None:
        if self.metrics.first_scheduled_time is None:
            self.metrics.first_scheduled_time = now

    def on_sampled(self, seq: Sequence, result, row: int, scheduler) -> None:
        """Row `row` of the StepResult sampled for `seq`: its candidates; a round once every beam has them."""
        beam = self._beam(seq.seq_id)
        k = 2 * self.width
        cands = [(int(t), float(lp), r + 1) for r, (t, lp) in
                 enumerate(zip(result.top_ids[row, :k], result.top_logprobs[row, :k]))]
        tok = int(result.tokens[row])
        if all(t != tok for t, _, _ in cands):   # sampled outside the top 2W (temperature > 0)
            cands.append((tok, float(result.logprob[row]), int(result.rank[row])))
        beam.candidates = cands
        if self.metrics.first_token_time is None:
            self.metrics.first_token_time = time.time()
        if all(b.candidates is not None for b in self.beams):
            self._advance(scheduler)

    def on_scheduler_finished(self, seq: Sequence, scheduler) -> None:
        """The scheduler ended the beam (more blocks than the whole pool): it is finished as it stands."""
        beam = self._beam(seq.seq_id)
        self.beams.remove(beam)
        self.finished_beams.append(BeamSearchSequence(list(beam.tokens), cum_logprob=beam.cum_logprob,
                                                      logprobs=beam.logprobs, finish_reason="length"))
        if not self.beams:
            self._finish()
        elif all(b.candidates is not None for b in self.beams):
            self._advance(scheduler)

    def release_waiting_parents(self, scheduler) -> bool:
        """Stall under KV pressure: beams holding candidates give their blocks back (children recompute)."""
        freed = False
        for beam in self.beams:
            if beam.candidates is not None and beam.attached:
                scheduler.finish_sequence(beam.seq_id, SequenceStatus.FINISHED_STOPPED)
                beam.attached = False
                freed = True
        return freed

    def abort(self, scheduler) -> None:
        for beam in self.beams:
            self._retire(beam, scheduler)
        self.beams = []
        self._finish()

    def to_output(self) -> RequestOutput:
        """The finished beams best first as completions (text: the generated tokens; an eos that finished a
        beam left out unless include_stop_str_in_output); none while the search runs."""
        outs = []
        if self.done:
            n = len(self.prompt_token_ids)
            for i, s in enumerate(self.ranked()):
                gen = s.tokens[n:]
                shown = gen[:-1] if s.finish_reason == "stop" and not self.params.include_stop_str_in_output else gen
                outs.append(CompletionOutput(i, self.tokenizer.decode(shown), gen, s.cum_logprob, s.logprobs,
                                             s.finish_reason, s.stop_reason))
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, None, outs, self.done,
                             metrics=self.metrics)

    def ranked(self) -> list[BeamSearchSequence]:
        """The best W finished beams by vLLM's score (stable: earlier wins ties)."""
        self.finished_beams.sort(key=self._score, reverse=True)
        del self.finished_beams[self.width:]
        return self.finished_beams

    # ---- one round ----------------------------------------------------------------------------------
    def _advance(self, scheduler) -> None:
        w = self.width
        pool = []                                  # (cum_logprob, order, beam, token, candidate index)
        for b in self.beams:
            for j, (tok, lp, _) in enumerate(b.candidates):
                cum = b.cum_logprob + lp
                if tok in self.eos:
                    self.finished_beams.append(BeamSearchSequence(
                        b.tokens + [tok], cum_logprob=cum, logprobs=b.logprobs + [self._entry(b, j)],
                        finish_reason="stop", stop_reason=tok))
                else:
                    pool.append((cum, len(pool), b, tok, j))
        pool.sort(key=lambda c: (-c[0], c[1]))     # best cum_logprob first; ties keep candidate order
        chosen = pool[:w]
        last = len(self.beams[0].tokens) + 1 - len(self.prompt_token_ids) >= self.rounds
        self.ranked()                              # only the best W can ever be returned: keep the list short
        if last or not chosen:
            for cum, _, b, tok, j in chosen:
                self.finished_beams.append(BeamSearchSequence(b.tokens + [tok], cum_logprob=cum,
                                                              logprobs=b.logprobs + [self._entry(b, j)],
                                                              finish_reason="length"))
            self.abort(scheduler)
            return
        by_parent: dict[int, list] = {}
        for c in chosen:
            by_parent.setdefault(id(c[2]), []).append(c)
        # unchosen parents first: their seats and blocks are free before anyone forks
        for b in self.beams:
            if id(b) not in by_parent:
                self._retire(b, scheduler)
        new_beams = []
        for group in by_parent.values():
            parent = group[0][2]
            for cum, _, _, tok, j in group[1:]:          # forks copy the parent BEFORE it moves on
                new_beams.append(self._spawn(parent, tok, cum, self._entry(parent, j), scheduler))
            cum, _, _, tok, j = group[0]
            entry = self._entry(parent, j)
            if parent.attached:
                scheduler.append_token(parent.seq_id, tok)
                parent.tokens.append(tok)
                parent.cum_logprob, parent.logprobs = cum, parent.logprobs + [entry]
                parent.candidates = None
                new_beams.append(parent)
            else:
                new_beams.append(self._spawn(parent, tok, cum, entry, scheduler))
        self.beams = new_beams

    def _spawn(self, parent: _Beam, tok: int, cum: float, entry: dict, scheduler) -> _Beam:
        """A child beam continuing `parent` with `tok`: a fork (shared blocks) or, for a parent that
        gave its blocks back, a new sequence that recomputes."""
        child = _Beam(self._new_id(), parent.tokens + [tok], cum, parent.logprobs + [entry])
        if parent.attached:
            scheduler.fork_sequence(parent.seq_id, child.seq_id, self.row_params, time.time())
            scheduler.append_token(child.seq_id, tok)
        else:
            n = len(self.prompt_token_ids)
            seq = Sequence(child.seq_id, self.prompt_token_ids, self.row_params, time.time(),
                           request_id=self.request_id, output_token_ids=child.tokens[n:])
            seq.lora = self.lora
            scheduler.add_sequence(seq)
        return child

    def _retire(self, beam: _Beam, scheduler) -> None:
        """The beam is no longer live: its Sequence (if it still has one) is finished, its blocks freed."""
        if beam.attached:
            scheduler.finish_sequence(beam.seq_id, SequenceStatus.FINISHED_STOPPED)
        beam.attached = False

    def _finish(self) -> None:
        if not self.done:
            self.done = True
            self.metrics.finished_time = time.time()

    def _new_id(self) -> str:
        self._next_beam += 1
        return f"{self.request_id}#beam{self._next_beam - 1}"

    def _beam(self, seq_id: str) -> _Beam:
        return next(b for b in self.beams if b.seq_id == seq_id)

    def _entry(self, beam: _Beam, j: int) -> dict:
        """vLLM's logprobs entry of a chosen token: the chosen token first, then the beam's other candidates."""
        cands = beam.candidates
        order = [j] + [i for i in range(len(cands)) if i != j]
        return {cands[i][0]: Logprob(cands[i][1], cands[i][2], self.decode_token(cands[i][0])) for i in order}

    def _score(self, seq: BeamSearchSequence) -> float:
        return beam_search_score(len(seq.tokens), seq.cum_logprob, seq.finish_reason == "stop",
                                 self.params.length_penalty)


def to_beam_search_output(out: RequestOutput, tokenizer, params: BeamSearchParams) -> BeamSearchOutput:
    """vLLM's BeamSearchOutput from a finished beam-search RequestOutput: tokens are prompt + generated and
    text their decoding (special tokens kept), a finishing eos left out unless include_stop_str_in_output."""
    seqs = []
    for c in out.outputs:
        tokens = list(out.prompt_token_ids) + list(c.token_ids)
        shown = tokens[:-1] if c.finish_reason == "stop" and not params.include_stop_str_in_output else tokens
        seqs.append(BeamSearchSequence(tokens, tokenizer.decode(shown), c.cumulative_logprob, c.logprobs,
                                       c.finish_reason, c.stop_reason))
    return BeamSearchOutput(sequences=seqs)
