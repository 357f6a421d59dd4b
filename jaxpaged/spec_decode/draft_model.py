"""DraftModelProposer: a small model of the same vocabulary proposes k tokens, autoregressively, over
its own paged KV cache (its own ModelRunner and BlockManager inside the same engine).

Per step, for the sequences that draft (Speculator.propose decides which, and each one's k):

  1. catch-up: each computes its tokens [valid, num_tokens) in the draft (a prefill the first time,
     chunked under max_num_batched_tokens; usually just the last token or two) and samples d0;
  2. k - 1 single-token steps: d_{j-1} at position num_tokens - 1 + j -> d_j.

The draft samples greedily: the proposal is a point mass at the draft's argmax, so the Speculator's
accept-while-equal rule is the exact rejection-sampling rule at any target temperature (no q needed).
`valid` (the positions whose draft K/V match the sequence's tokens) is the real tokens it had computed
plus the drafts it fed that the target accepted; the table is truncated to it, so rejected drafts'
K/V is overwritten. Tables of sequences that stop running (finished, aborted, preempted) are dropped.

The draft pool has as many blocks as the target's (same block ids are NOT shared: it is its own
BlockManager), so it holds every running sequence; its bytes come on top of the target's pool
(logged). A sequence the draft pool cannot hold simply does not draft.
"""
from __future__ import annotations

import logging

from jaxpaged.block_manager import BlockManager
from jaxpaged.sampler import SamplingRow
from jaxpaged.sampling_params import SamplingParams
from jaxpaged.scheduler import ScheduledSequence

logger = logging.getLogger(__name__)

_GREEDY = SamplingRow(SamplingParams(temperature=0.0))


class _DraftView:
    """The token view the runner's input builder reads: the sequence's tokens plus drafts so far."""
    __slots__ = ("prompt_token_ids", "output_token_ids", "spec_token_ids", "lora")

    def __init__(self, seq, drafts: list[int]):
        self.prompt_token_ids = seq.prompt_token_ids
        self.output_token_ids = seq.output_token_ids + drafts if drafts else seq.output_token_ids
        self.spec_token_ids: list[int] = []
        self.lora = None


class DraftModelProposer:
    def __init__(self, config, target_model_config, target_tokenizer, num_blocks: int, max_model_len: int,
                 progress: bool = True):
        from jaxpaged.backends import kv_bytes_per_block, kv_cache_dtype
        from jaxpaged.convert import load_model
        from jaxpaged.models import build_state
        from jaxpaged.runner import ModelRunner

        spec = config.speculative_config
        loaded = load_model(spec.model, dtype=config.dtype, cache_dir=config.download_dir, progress=progress,
                            write_cache=True)
        check_same_vocabulary(loaded.config, loaded.tokenizer, target_model_config, target_tokenizer)
        draft_config = config.replace(model=spec.model, tokenizer=None, speculative_config=None, quantization=None,
                                      enable_lora=False, tensor_parallel_size=1)
        graphdef, state = build_state(loaded.config, loaded.params, config.dtype)
        kv_dtype = kv_cache_dtype(draft_config)
        logger.info("speculative draft model %s: its own KV pool of %d blocks, %.1f MiB", spec.model, num_blocks - 1,
                    num_blocks * kv_bytes_per_block(loaded.config, config.block_size, kv_dtype) / 2 ** 20)
        self.runner = ModelRunner(draft_config, loaded.config, graphdef, state, num_blocks, max_model_len, kv_dtype,
                                  params_cache_entry=loaded.cache_entry)
        if not config.enforce_eager:
            self.runner.warmup(progress=progress)
        self.block_manager = BlockManager(num_blocks, config.block_size, enable_prefix_caching=False)
        self.max_tokens = config.max_num_batched_tokens
        # seq id -> (the Sequence, real tokens computed, drafts fed after them)
        self._fed: dict[str, tuple[object, int, list[int]]] = {}

    # ---- bookkeeping ----------------------------------------------------------------------------
    def drop_stale(self, running) -> None:
        live = {s.seq_id for s in running}
        for sid in [sid for sid in self._fed if sid not in live]:
            self.block_manager.free(sid)
            del self._fed[sid]

    def _valid(self, seq) -> int:
        """Positions whose draft K/V hold the sequence's tokens (0 without a table)."""
        fed = self._fed.get(seq.seq_id)
        if fed is not None and fed[0] is not seq:       # a new sequence under a reused id: start over
            self._forget(seq.seq_id)
            fed = None
        if fed is None:
            return 0
        _, n_real, tail = fed
        toks = seq.all_token_ids
        ok = n_real
        for d in tail:
            if ok >= len(toks) or toks[ok] != d:
                break
            ok += 1
        return min(ok, len(toks) - 1)          # the last token is fed again (it yields d0)

    def _grow(self, sid: str, num_tokens: int) -> list[int] | None:
        bm = self.block_manager
        if not bm.has_table(sid):
            return bm.allocate(sid, num_tokens)
        return bm.get_table(sid) if bm.append_slots(sid, num_tokens) is not None else None

    def _forget(self, sid: str) -> None:
        self.block_manager.free(sid)
        self._fed.pop(sid, None)

    # ---- proposing ------------------------------------------------------------------------------
    def propose(self, cands: list, running) -> list[list[int]]:
        """cands: (sequence, k) pairs; returns each one's drafts (up to k tokens, [] when its KV does not fit)."""
        self.drop_stale(running)
        drafts: list[list[int]] = [[] for _ in cands]
        start = []
        for seq, _ in cands:
            v = self._valid(seq)
            if self.block_manager.has_table(seq.seq_id):
                self.block_manager.truncate(seq.seq_id, min(v, self.block_manager.table_num_tokens(seq.seq_id)))
            start.append(v)
        alive = list(range(len(cands)))
        # 1. catch-up chunks; the chunk that reaches the sequence's end samples d0
        while True:
            todo = [i for i in alive if start[i] < cands[i][0].num_tokens]
            if not todo:
                break
            alive = self._step_catch_up(cands, todo, start, drafts, alive)
        # 2. autoregressive single-token steps
        kmax = max((k for _, k in cands), default=0)
        for j in range(1, kmax):
            todo = [i for i in alive if len(drafts[i]) == j and cands[i][1] > j]
            if not todo:
                break
            scheduled, rows = [], []
            for i in todo:
                seq = cands[i][0]
                pos = seq.num_tokens - 1 + j                  # where d_{j-1} sits
                table = self._grow(seq.seq_id, pos + 1)
                if table is None:
                    continue
                scheduled.append((i, ScheduledSequence(_DraftView(seq, drafts[i][:j]), 1, pos, table, True)))
                rows.append(_GREEDY)
            if not scheduled:
                break
            result = self.runner.execute([s for _, s in scheduled], [], rows)
            for r, (i, _) in enumerate(scheduled):
                drafts[i].append(int(result.tokens[r]))
        for i in alive:
            seq = cands[i][0]
            self._fed[seq.seq_id] = (seq, seq.num_tokens, drafts[i][:-1])    # the last draft was never fed
        return drafts

    def _step_catch_up(self, cands, todo, start, drafts, alive) -> list[int]:
        budget = self.max_tokens
        scheduled, rows = [], []
        for i in todo:
            if budget <= 0:
                break
            seq = cands[i][0]
            n = min(seq.num_tokens - start[i], budget)
            table = self._grow(seq.seq_id, start[i] + n)
            if table is None:                                   # the draft pool is full: no drafts for it
                self._forget(seq.seq_id)
                alive = [a for a in alive if a != i]
                continue
            last = start[i] + n == seq.num_tokens
            scheduled.append((i, n, ScheduledSequence(seq, n, start[i], table, last)))
            rows.append(_GREEDY if last else None)
            budget -= n
        if scheduled:
            result = self.runner.execute([s for _, _, s in scheduled], [], rows)
            for r, (i, n, s) in enumerate(scheduled):
                start[i] += n
                if s.sample:
                    drafts[i].append(int(result.tokens[r]))
        return alive


def check_same_vocabulary(draft_cfg, draft_tok, target_cfg, target_tok) -> None:
    """The draft must speak the target's token ids: same vocabulary size and the same token -> id map."""
    if draft_cfg.vocab_size != target_cfg.vocab_size:
        raise ValueError(f"speculative_config.model: the draft's vocabulary has {draft_cfg.vocab_size} tokens, "
                         f"the target's {target_cfg.vocab_size}; a draft model needs the target's tokenizer")
    if draft_tok is not None and target_tok is not None and draft_tok.get_vocab() != target_tok.get_vocab():
        raise ValueError("speculative_config.model: the draft's tokenizer maps tokens to other ids than the "
                         "target's; a draft model needs the target's tokenizer")
