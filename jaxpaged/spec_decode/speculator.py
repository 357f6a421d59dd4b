"""Speculator: the engine's side of speculative decoding (n-gram or draft-model drafts, verified in the ragged step).

One step with speculation (engine.py calls these around the ordinary step):

    speculator.propose(scheduler.running, requests)   # drafts -> seq.spec_token_ids (before schedule)
    out = scheduler.schedule()                         # a drafting decode computes 1 + k tokens
    rows, first = speculator.sampling_rows(out.scheduled, states)   # 1 + k SamplingRows per such sequence
    result = runner.execute(..., rows)                 # the target's sample at every one of those positions
    scheduler.update_from_output(out)                  # the real token only
    speculator.on_verified(state, ss, result, first[i], scheduler)  # accept, append, roll back

Acceptance (exact). Row j of a drafting sequence is sampled with the SamplingRow of output position
n_out + j as if drafts[:j] were already its tokens: the same penalties history, min_tokens bans,
logit_bias and seed offset (the seeded uniforms hash (seed, n_out + j)) as the non-speculative step
that would sample that position. Drafts are accepted while the target's sample equals them; the
first differing sample (or the sample after the last draft) is emitted as well, so a step emits
1 .. k + 1 tokens. This IS the standard rejection-sampling rule for a point-mass proposal q = delta(x):
accept x with probability min(1, p(x) / q(x)) = p(x) (the sample equals x), and on rejection a token
from normalize(max(0, p - q)) = p restricted to tokens != x (the sample given that it is not x). So:
greedy output is token for token the non-speculative output; sampled outputs have the target's
distribution; a seeded request gives exactly its non-speculative tokens (each position's draw is the
same draw). The device runs the ordinary sampler on every row; acceptance is a host compare.

Which sequences draft (the per-step rule): none when more than `disable_by_batch_size` sequences are
running; otherwise each running decode sequence (one token left to compute) of a SamplingParams
request (beam search does not speculate; a grammar-constrained row drafts only what its grammar
accepts and each of its rows gets the mask after the drafts before it, spec_decode/grammar.py),
with k cut so the step can never emit past max_tokens or max_model_len; a sequence whose n-gram
lookup finds nothing decodes normally. A step where nobody drafts runs the plain step unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from jaxpaged.request_state import RequestState
from jaxpaged.sampler import SamplingRow
from jaxpaged.spec_decode.config import SpeculativeConfig
from jaxpaged.spec_decode.grammar import DraftGrammar, grammar_prefix
from jaxpaged.spec_decode.ngram import propose_ngram


@dataclass
class SpecDecodeStats:
    """Cumulative counters (vLLM's spec_decode metrics)."""
    num_drafts: int = 0              # verification of one sequence's drafts in one step
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)   # [k]: drafts accepted at position i


class _Count:
    """A drafted row's output tokens where only their number is read (no penalties: the count is the
    seed offset and the min_tokens test), so no list of the whole output is copied per row."""
    __slots__ = ("n",)

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n


class _TokenArrays:
    """Each running sequence's tokens as a growing numpy array (tokens only ever append), so the
    n-gram lookup does not convert the whole list every step."""

    def __init__(self):
        self._bufs: dict[str, tuple[object, np.ndarray, int]] = {}   # seq id -> (the Sequence, buffer, filled)

    def get(self, seq) -> np.ndarray:
        toks = seq.all_token_ids
        n_new = len(toks)
        owner, buf, n = self._bufs.get(seq.seq_id, (None, None, 0))
        if owner is not seq:                 # a new sequence under a reused id starts over
            buf, n = None, 0
        if buf is None or buf.shape[0] < n_new:
            grown = np.empty(max(256, 2 * n_new), np.int64)
            if buf is not None:
                grown[:n] = buf[:n]
            buf = grown
        if n_new > n:
            buf[n:n_new] = toks[n:n_new]
        self._bufs[seq.seq_id] = (seq, buf, n_new)
        return buf[:n_new]

    def keep_only(self, running) -> None:
        if self._bufs:
            live = {s.seq_id for s in running}
            self._bufs = {k: v for k, v in self._bufs.items() if k in live}


def num_accepted(drafts: list[int], sampled) -> int:
    """Leading drafts equal to the target's samples at their positions (sampled has >= len(drafts) rows)."""
    a = 0
    while a < len(drafts) and int(sampled[a]) == drafts[a]:
        a += 1
    return a


class Speculator:
    def __init__(self, config: SpeculativeConfig, max_model_len: int, draft=None):
        """draft: the DraftModelProposer of the draft_model method (draft_model.py); None for ngram."""
        if (config.method == "draft_model") != (draft is not None):
            raise ValueError(f"speculative_config.method: {config.method!r} needs "
                             f"{'a draft model proposer' if draft is None else 'no draft model'}")
        self.config = config
        self.draft = draft
        self.k = config.num_speculative_tokens
        self.max_model_len = max_model_len
        self.stats = SpecDecodeStats(accepted_per_pos=[0] * self.k)
        self._drafting: list = []           # sequences given drafts in the last propose()
        self._tokens = _TokenArrays()

    # ---- before schedule() ----------------------------------------------------------------------
    def propose(self, running: list, requests: dict) -> int:
        """Sets spec_token_ids of the running sequences that draft this step (clearing last step's);
        returns how many draft."""
        for seq in self._drafting:
            seq.spec_token_ids = []
        self._drafting = []
        limit = self.config.disable_by_batch_size
        if limit is not None and len(running) > limit:
            return 0
        cands = []
        for seq in running:
            if seq.num_computed_tokens != seq.num_tokens - 1:
                continue
            k = self._room(seq, requests.get(seq.request_id))
            if k >= 1:
                cands.append((seq, k))
        for (seq, _), drafts in zip(cands, self._propose(cands, running)):
            if drafts and seq.structured_output is not None:
                drafts = grammar_prefix(seq.structured_output, drafts)
            if drafts:
                seq.spec_token_ids = drafts
                self._drafting.append(seq)
        return len(self._drafting)

    def after_step(self, running: list) -> None:
        """The draft model's tables of sequences no longer running go back (finished, aborted, preempted)."""
        if self.draft is not None:
            self.draft.drop_stale(running)
        else:
            self._tokens.keep_only(running)

    def _propose(self, cands: list, running: list) -> list[list[int]]:
        if self.draft is not None:
            return self.draft.propose(cands, running)
        cfg = self.config
        return [propose_ngram(self._tokens.get(seq), k, cfg.prompt_lookup_max, cfg.prompt_lookup_min)
                for seq, k in cands]

    def _room(self, seq, state) -> int:
        """Drafts this sequence may verify: k, less what would pass max_tokens / max_model_len (a step
        emits up to k + 1 tokens); 0 for requests that do not speculate."""
        if not isinstance(state, RequestState):       # beam search does not speculate
            return 0
        params = state.params
        left = self.max_model_len - seq.num_tokens
        if params.max_tokens is not None:
            left = min(left, params.max_tokens - seq.num_output_tokens)
        return min(self.k, left - 1)

    # ---- the step -------------------------------------------------------------------------------
    @staticmethod
    def verifies(scheduled) -> bool:
        return any(s.num_spec_tokens for s in scheduled)

    @staticmethod
    def sampling_rows(scheduled, states) -> tuple[list, list[int]]:
        """(rows, first): the runner's flat sampling rows of a verification step and each scheduled
        sequence's first row. A drafting sequence has 1 + k rows: row j samples output position
        n_out + j with drafts[:j] as if already generated (see the module docstring)."""
        rows: list = []
        first: list[int] = []
        for st, s in zip(states, scheduled):
            first.append(len(rows))
            if not s.sample:
                rows.append(None)
                continue
            base = st.sampling_row(s.seq)
            rows.append(base)
            drafts = s.seq.spec_token_ids[: s.num_spec_tokens]
            n_out = len(base.output_token_ids)
            for j in range(1, len(drafts) + 1):
                # penalties read the tokens themselves; otherwise only their count matters
                out = list(base.output_token_ids) + drafts[:j] if base.params.uses_penalties else _Count(n_out + j)
                grammar = DraftGrammar(base.grammar, drafts[:j]) if base.grammar is not None else None
                rows.append(SamplingRow(base.params, base.prompt_token_ids, out, grammar))
        return rows, first

    def on_verified(self, state, s, result, first: int, scheduler) -> int:
        """Emits the accepted drafts and the target's next token of scheduled sequence `s` (rows
        first .. first + k of `result`), stopping where the request stops (max_tokens, stop strings,
        eos: later tokens are dropped); rolls back the rejected drafts' slots. Returns tokens emitted."""
        seq, k = s.seq, s.num_spec_tokens
        if k == 0:
            state.on_sampled(seq, result, first, scheduler)
            return 1
        drafts = seq.spec_token_ids[:k]
        a = num_accepted(drafts, result.tokens[first: first + k])
        self._count(state, k, a)
        emitted = 0
        for j in range(a + 1):
            state.on_sampled(seq, result, first + j, scheduler)
            emitted += 1
            if seq.status.is_finished:
                return emitted
        scheduler.commit_spec_tokens(seq, a)
        return emitted

    def _count(self, state, k: int, a: int) -> None:
        st = self.stats
        st.num_drafts += 1
        st.num_draft_tokens += k
        st.num_accepted_tokens += a
        for i in range(a):
            st.accepted_per_pos[i] += 1
        m = state.metrics
        m.spec_num_drafts += 1
        m.spec_num_draft_tokens += k
        m.spec_num_accepted_tokens += a
