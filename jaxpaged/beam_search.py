"""Beam search inside the engine: every beam is a scheduler Sequence, and beams share KV blocks.

vLLM's algorithm (`LLM.beam_search`), driven directly on the engine's scheduler and runner
instead of through one generate() call per token. W = beam_width:

    each prompt ("instance") starts as ONE Sequence: the prompt is computed once
    loop: scheduler.schedule() -> runner.execute() (greedy rows asking for 2W logprobs)
          -> scheduler.update_from_output(); a sampled row gives that beam its candidates
    an instance whose live beams all have candidates takes one round:
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

Exclusive use: beam search needs every scheduled row to be one of its beams, so it runs only on
an idle engine (no unfinished requests; RuntimeError otherwise) and the engine must not be
stepped by anyone else meanwhile. At most max_num_seqs // W prompts are searched at a time (so
forks always find a seat); the others wait their turn. Every beam's Sequence is finished on the
way out, also on errors, so no block is left in use.

KV pool pressure: the scheduler may preempt beams (they recompute). If nothing can be scheduled
because beams that already have their candidates hold the blocks a waiting sibling needs, those
beams release their blocks (finish_sequence) and their children are re-added as new requests
that recompute (the prefix cache serves their full blocks).
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from jaxpaged.detokenizer import TokenDecoder
from jaxpaged.outputs import BeamSearchOutput, BeamSearchSequence, Logprob
from jaxpaged.sequence import Sequence, SequenceStatus
from jaxpaged.sampler import SamplingRow
from jaxpaged.sampling_params import BeamSearchParams, SamplingParams

_run_ids = itertools.count()


def beam_search_score(num_tokens: int, cum_logprob: float, ended_by_eos: bool, length_penalty: float) -> float:
    """vLLM's score: cum_logprob / L ** length_penalty, L = prompt + generated tokens (eos excluded)."""
    length = num_tokens - 1 if ended_by_eos else num_tokens
    return cum_logprob / (length ** length_penalty)


@dataclass
class _Beam:
    """One live beam. `rid` names its scheduler Sequence; `tokens` are prompt + generated."""
    rid: str
    tokens: list[int]
    cum_logprob: float = 0.0
    logprobs: list = field(default_factory=list)      # per generated token: {token_id: Logprob}
    candidates: list | None = None                     # [(token, logprob, rank)] of this round
    attached: bool = True                              # its Sequence is in the scheduler


@dataclass
class _Instance:
    """The search of one prompt."""
    index: int
    prompt_ids: list[int]
    rounds: int                                        # tokens each beam may generate
    beams: list[_Beam] = field(default_factory=list)
    finished: list[BeamSearchSequence] = field(default_factory=list)
    done: bool = False

    def ready(self) -> bool:
        return bool(self.beams) and all(b.candidates is not None for b in self.beams)


class BeamSearch:
    """Drives one LLM.beam_search call over an idle LLMEngine."""

    def __init__(self, engine, params: BeamSearchParams):
        if not isinstance(params, BeamSearchParams):
            raise ValueError(f"params: expected BeamSearchParams, got {type(params).__name__}")
        cfg = engine.config
        w = params.beam_width
        if 2 * w > cfg.max_logprobs:
            raise ValueError(f"beam_width: {w} needs 2 * beam_width = {2 * w} candidates per beam, more than "
                             f"max_logprobs ({cfg.max_logprobs}); raise max_logprobs or lower beam_width")
        if w > cfg.max_num_seqs:
            raise ValueError(f"beam_width: {w} exceeds max_num_seqs ({cfg.max_num_seqs})")
        if engine.has_unfinished_requests() or engine.scheduler.has_unfinished_sequences():
            raise RuntimeError("beam_search: the engine has unfinished requests; beam search needs an idle engine")
        self.engine, self.params, self.width = engine, params, w
        self.scheduler, self.runner = engine.scheduler, engine.runner
        tok = engine.get_tokenizer()
        self.tokenizer = tok
        eos = set(engine.model_config.eos_token_ids)
        if not eos and getattr(tok, "eos_token_id", None) is not None:
            eos = {tok.eos_token_id}
        self.eos = frozenset() if params.ignore_eos else frozenset(eos)
        self.decode_token = TokenDecoder(tok)
        # the per-step row of every beam: greedy (or the requested temperature), 2W logprobs
        self.row_params = SamplingParams(temperature=params.temperature, max_tokens=1, logprobs=2 * w,
                                         ignore_eos=True)
        self._prefix = f"beam{next(_run_ids)}-"
        self._ids = itertools.count()
        self._owner: dict[str, tuple[_Instance, _Beam]] = {}
        self.peak_used_blocks = 0         # KV blocks in use at the fullest step (diagnostics, tests)
        self.num_steps = 0

    # ---- entry --------------------------------------------------------------------------------------
    def run(self, prompts: list, use_tqdm: bool = False) -> list[BeamSearchOutput]:
        eng = self.engine
        instances = []
        for i, prompt in enumerate(prompts):      # validate every prompt before anything runs
            _, ids = eng._tokenize(prompt)
            eng._check_length(ids)
            rounds = min(self.params.max_tokens, eng.max_model_len - len(ids))
            instances.append(_Instance(i, ids, rounds))
        max_active = max(1, self.scheduler.max_num_seqs // self.width)
        queue = list(instances)
        active: list[_Instance] = []
        bar = tqdm(total=len(instances), desc="Beam search", disable=not use_tqdm)
        try:
            while queue or active:
                while queue and len(active) < max_active:
                    inst = queue.pop(0)
                    self._start(inst)
                    active.append(inst)
                self._step()
                for inst in active:
                    if inst.ready():
                        self._advance(inst)
                still = [inst for inst in active if not inst.done]
                bar.update(len(active) - len(still))
                active = still
        finally:
            bar.close()
            for rid in list(self._owner):          # errors, interrupts: leave no block in use
                self._release(rid)
        return [self._output(inst) for inst in instances]

    # ---- engine steps -------------------------------------------------------------------------------
    def _new_id(self) -> str:
        return f"{self._prefix}{next(self._ids)}"

    def _start(self, inst: _Instance) -> None:
        beam = _Beam(self._new_id(), list(inst.prompt_ids))
        self.scheduler.add_sequence(Sequence(beam.rid, inst.prompt_ids, self.row_params, time.time()))
        self._owner[beam.rid] = (inst, beam)
        inst.beams.append(beam)

    def _step(self) -> None:
        sched = self.scheduler
        out = sched.schedule()
        bm = sched.block_manager
        self.peak_used_blocks = max(self.peak_used_blocks, bm.num_total_blocks - bm.num_free_blocks)
        for rid in out.finished:                   # more blocks than the whole pool: ends here
            self._drop_unfittable(rid)
        if not out.scheduled:
            if not out.finished and not self._release_waiting_parents():
                raise RuntimeError("beam_search: nothing can be scheduled (KV pool too small for one beam?)")
            return
        rows = [SamplingRow(self.row_params, s.seq.prompt_token_ids, s.seq.output_token_ids)
                if s.sample else None for s in out.scheduled]
        result = self.runner.execute(out.scheduled, out.block_copies, rows)
        sched.update_from_output(out)
        self.num_steps += 1
        k = 2 * self.width
        for i, s in enumerate(out.scheduled):
            if rows[i] is None:
                continue
            _, beam = self._owner[s.seq.seq_id]
            cands = [(int(t), float(lp), r + 1) for r, (t, lp) in
                     enumerate(zip(result.top_ids[i, :k], result.top_logprobs[i, :k]))]
            tok = int(result.tokens[i])
            if all(t != tok for t, _, _ in cands):   # sampled outside the top 2W (temperature > 0)
                cands.append((tok, float(result.logprob[i]), int(result.rank[i])))
            beam.candidates = cands

    def _release(self, rid: str) -> None:
        self._owner.pop(rid, None)
        self.scheduler.finish_sequence(rid, SequenceStatus.FINISHED_STOPPED)

    def _retire(self, beam: _Beam) -> None:
        """The beam is no longer live: its Sequence (if it still has one) is finished, its blocks freed."""
        if beam.attached:
            self._release(beam.rid)
        else:
            self._owner.pop(beam.rid, None)

    def _release_waiting_parents(self) -> bool:
        """Stall under KV pressure: beams holding candidates give their blocks back (children recompute)."""
        freed = False
        for rid, (_, beam) in list(self._owner.items()):
            if beam.candidates is not None and beam.attached:
                self._release(rid)
                beam.attached = False
                freed = True
        return freed

    def _drop_unfittable(self, rid: str) -> None:
        inst, beam = self._owner.pop(rid)
        inst.beams.remove(beam)
        inst.finished.append(BeamSearchSequence(list(beam.tokens), cum_logprob=beam.cum_logprob,
                                                logprobs=beam.logprobs, finish_reason="length"))
        if not inst.beams:
            inst.done = True

    # ---- one round of one instance ------------------------------------------------------------------
    def _advance(self, inst: _Instance) -> None:
        w = self.width
        pool = []                                  # (cum_logprob, order, beam, token, logprob position)
        for b in inst.beams:
            for j, (tok, lp, _) in enumerate(b.candidates):
                cum = b.cum_logprob + lp
                if tok in self.eos:
                    inst.finished.append(BeamSearchSequence(
                        b.tokens + [tok], cum_logprob=cum, logprobs=b.logprobs + [self._entry(b, j)],
                        finish_reason="stop", stop_reason=tok))
                else:
                    pool.append((cum, len(pool), b, tok, j))
        pool.sort(key=lambda c: (-c[0], c[1]))     # best cum_logprob first; ties keep candidate order
        chosen = pool[:w]
        last = len(inst.beams[0].tokens) + 1 - len(inst.prompt_ids) >= inst.rounds
        self._keep_best_finished(inst)
        if last or not chosen:
            for cum, _, b, tok, j in chosen:
                inst.finished.append(BeamSearchSequence(b.tokens + [tok], cum_logprob=cum,
                                                        logprobs=b.logprobs + [self._entry(b, j)],
                                                        finish_reason="length"))
            for b in inst.beams:
                self._retire(b)
            inst.beams, inst.done = [], True
            return
        by_parent: dict[int, list] = {}
        for c in chosen:
            by_parent.setdefault(id(c[2]), []).append(c)
        # unchosen parents first: their seats and blocks are free before anyone forks
        for b in inst.beams:
            if id(b) not in by_parent:
                self._retire(b)
        new_beams = []
        for group in by_parent.values():
            parent = group[0][2]
            for cum, _, _, tok, j in group[1:]:          # forks copy the parent BEFORE it moves on
                new_beams.append(self._spawn(inst, parent, tok, cum, self._entry(parent, j)))
            cum, _, _, tok, j = group[0]
            entry = self._entry(parent, j)
            if parent.attached:
                self.scheduler.append_token(parent.rid, tok)
                parent.tokens.append(tok)
                parent.cum_logprob, parent.logprobs = cum, parent.logprobs + [entry]
                parent.candidates = None
                new_beams.append(parent)
            else:
                self._owner.pop(parent.rid, None)
                new_beams.append(self._spawn(inst, parent, tok, cum, entry))
        inst.beams = new_beams

    def _spawn(self, inst: _Instance, parent: _Beam, tok: int, cum: float, entry: dict) -> _Beam:
        """A child beam continuing `parent` with `tok`: a fork (shared blocks) or, for a parent that
        gave its blocks back, a new request that recomputes."""
        child = _Beam(self._new_id(), parent.tokens + [tok], cum, parent.logprobs + [entry])
        if parent.attached:
            self.scheduler.fork_sequence(parent.rid, child.rid, self.row_params, time.time())
            self.scheduler.append_token(child.rid, tok)
        else:
            self.scheduler.add_sequence(Sequence(child.rid, inst.prompt_ids, self.row_params, time.time(),
                                                 output_token_ids=child.tokens[len(inst.prompt_ids):]))
        self._owner[child.rid] = (inst, child)
        return child

    def _entry(self, beam: _Beam, j: int) -> dict:
        """vLLM's logprobs entry of a chosen token: the chosen token first, then the beam's other candidates."""
        cands = beam.candidates
        order = [j] + [i for i in range(len(cands)) if i != j]
        return {cands[i][0]: Logprob(cands[i][1], cands[i][2], self.decode_token(cands[i][0])) for i in order}

    def _score(self, seq: BeamSearchSequence) -> float:
        return beam_search_score(len(seq.tokens), seq.cum_logprob, seq.finish_reason == "stop",
                                 self.params.length_penalty)

    def _keep_best_finished(self, inst: _Instance) -> None:
        # only the best W can ever be returned: keep the list short (stable sort: earlier wins ties)
        inst.finished.sort(key=self._score, reverse=True)
        del inst.finished[self.width:]

    def _output(self, inst: _Instance) -> BeamSearchOutput:
        self._keep_best_finished(inst)
        for seq in inst.finished:
            toks = seq.tokens
            if seq.finish_reason == "stop" and not self.params.include_stop_str_in_output:
                toks = toks[:-1]
            seq.text = self.tokenizer.decode(toks)
        return BeamSearchOutput(sequences=inst.finished)


def beam_search(engine, prompts, params: BeamSearchParams, use_tqdm: bool = False) -> list[BeamSearchOutput]:
    """Beam search of each prompt on an idle LLMEngine. prompts: a str, a list of str / token-id lists /
    {"prompt"} or {"prompt_token_ids"} dicts, or one token-id list. One BeamSearchOutput per prompt, in order."""
    if isinstance(prompts, (str, dict)):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts: must not be empty")
    if all(isinstance(t, int) for t in prompts):
        prompts = [prompts]                        # one prompt given as token ids
    return BeamSearch(engine, params).run(prompts, use_tqdm=use_tqdm)
