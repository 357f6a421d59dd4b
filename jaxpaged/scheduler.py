"""Scheduler: continuous batching under a token budget — chunked prefill, prefix hits, preemption.

Pure Python, no jax. The scheduler's unit is a Sequence (sequence.py): one token sequence; a
user request is one Sequence, or several (n > 1 samples, beams). One rule: every sequence's
`num_computed_tokens` catches up with its `num_tokens`, at most `max_num_batched_tokens` tokens
per step over all sequences and at most `max_num_seqs` sequences running. There is no prefill
or decode phase: a new prompt, a prompt chunk, a decode token, a prefix-cache hit and a resumed
preempted sequence are all the same "compute tokens [num_computed_tokens, num_tokens)".

One step (the engine calls these in order):

    out = scheduler.schedule()         # which sequences advance by how many tokens
    ... runner: do out.block_copies, then run out.scheduled, sample where ss.sample ...
    scheduler.update_from_output(out)  # num_computed_tokens += num_new_tokens; hash full blocks
    scheduler.append_token(id, tok)    # for each sampled token
    scheduler.finish_sequence(id, st)  # stops, length limits, aborts: frees every block

schedule():
1. Running sequences, oldest first (`running` is kept sorted by arrival): each gets
   min(tokens left, budget left) tokens. When its blocks cannot grow, the youngest running
   sequence is preempted by recompute (blocks freed, num_computed_tokens = 0, status
   PREEMPTED, pushed to the FRONT of the waiting queue; its output tokens are kept and
   recomputed as context when it resumes) until the sequence fits — or it is itself the
   youngest, and is preempted. A sequence alone in the pool that still cannot grow needs more
   blocks than the pool has: it is finished with FINISHED_LENGTH and listed in
   SchedulerOutput.finished (the engine should have rejected it; see
   max_tokens_per_sequence()).
2. If nothing was preempted: waiting sequences are admitted first come first served (those whose
   structured-output grammar is still compiling are passed over until it is ready) while
   the budget, the seats and the blocks allow (a prompt larger than the budget left gets a
   chunk). At admission the prefix cache is looked up: the sequence starts at
   num_computed_tokens = num_cached_tokens = the cached prefix length (never the whole
   sequence: the last token is always computed).

Speculative decoding (spec_decode/): a running decode sequence (one token left to compute) whose
`spec_token_ids` the engine filled before schedule() computes 1 + k tokens: its last token and k
drafts, k cut to the budget left (the drafts count in the token budget) and dropped when its blocks
cannot grow (before any preemption). update_from_output advances it by the real token only;
`commit_spec_tokens` adds the accepted drafts and gives back the rejected drafts' slots.

Parallel sampling (n > 1, `add_sequence_group`): the leader (first sequence) prefills
prompt[:-1] alone; then every other member forks the leader's table (shared blocks,
refcount + 1) with num_computed_tokens = len(prompt) - 1, and each member computes the last
prompt token itself: the first write into the shared, partly filled block is a
copy-on-write listed in SchedulerOutput.block_copies. Seats for the members are reserved
when the leader is admitted. Beam search forks running sequences with `fork_sequence`.
"""
from __future__ import annotations

import bisect
import itertools
from collections import deque
from dataclasses import dataclass, field

from jaxpaged.block_manager import EMPTY_PREFIX, BlockManager
from jaxpaged.sequence import Sequence, SequenceStatus


@dataclass(slots=True)
class ScheduledSequence:
    seq: Sequence
    num_new_tokens: int       # tokens computed this step: all_token_ids[start : start + num_new_tokens]
    start: int                # == seq.num_computed_tokens at schedule time
    block_table: list[int]    # live table covering >= start + num_new_tokens tokens (read-only)
    sample: bool              # start + num_new_tokens - num_spec_tokens == seq.num_tokens at schedule time
    num_spec_tokens: int = 0  # speculative decoding: the last num_spec_tokens of the new tokens are
                              # seq.spec_token_ids[:num_spec_tokens], drafts verified this step


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSequence]
    num_batched_tokens: int
    block_copies: list[tuple[int, int]]  # (src, dst) copy-on-write copies to do, in order, BEFORE the step
    preempted: list[str]
    finished: list[Sequence] = field(default_factory=list)  # finished by the scheduler (FINISHED_LENGTH:
                                                            # more blocks than the whole pool); report them


@dataclass
class SchedulerStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float         # used blocks / total blocks (0..1)
    prefix_cache_queries: int     # tokens looked up in the prefix cache (cumulative)
    prefix_cache_hits: int        # of which found (cumulative)
    num_preemptions: int          # cumulative
    num_free_blocks: int = 0
    num_total_blocks: int = 0


class Scheduler:
    def __init__(self, *, num_blocks: int, block_size: int, max_num_seqs: int,
                 max_num_batched_tokens: int, max_model_len: int, enable_prefix_caching: bool = True,
                 max_loras: int | None = None):
        for name, v in (("max_num_seqs", max_num_seqs), ("max_num_batched_tokens", max_num_batched_tokens),
                        ("max_model_len", max_model_len)):
            if v < 1:
                raise ValueError(f"{name}: must be >= 1, got {v}")
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.enable_prefix_caching = enable_prefix_caching
        self.max_loras = max_loras      # LoRA: most distinct adapters among running sequences (device slots)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []          # sorted by _age: oldest first, youngest last
        self.seqs: dict[str, Sequence] = {}      # every unfinished sequence (pending group members too)
        self._age: dict[str, tuple[float, int]] = {}
        self._counter = itertools.count()
        # n > 1 groups whose members have not forked yet
        self._pending: dict[str, list[Sequence]] = {}   # leader id -> members
        self._leader_of: dict[str, str] = {}           # member id -> leader id
        self._prefill_target: dict[str, int] = {}      # leader id -> len(prompt) - 1
        self._num_pending = 0
        self._reserved_seats = 0                       # pending members of running leaders
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0
        self.num_preemptions = 0

    # ---- adding ------------------------------------------------------------------------
    def max_tokens_per_sequence(self) -> int:
        """The most tokens (prompt + output) one sequence can ever hold: the whole KV pool.

        The engine rejects at add_request (ValueError) a prompt that leaves no room in
        min(this, max_model_len) for one generated token; such a request could never run.
        """
        return self.block_manager.num_total_blocks * self.block_size

    def _check_new(self, req: Sequence) -> None:
        """The scheduler's preconditions (a sequence it could never run would stall the queue). User
        input is validated before it gets here (inputs.py); these guard direct callers."""
        if req.seq_id in self.seqs:
            raise ValueError(f"seq_id: {req.seq_id!r} is already in the scheduler")
        if req.num_tokens < 1:
            raise ValueError("prompt_token_ids: empty prompt")
        limit = min(self.max_model_len, self.max_tokens_per_sequence())
        if req.num_tokens > limit:
            raise ValueError(f"prompt_token_ids: {req.num_tokens} tokens exceed the limit of {limit} "
                             f"(max_model_len {self.max_model_len}, KV pool "
                             f"{self.max_tokens_per_sequence()} tokens)")

    def _register(self, req: Sequence) -> None:
        self.seqs[req.seq_id] = req
        self._age[req.seq_id] = (req.arrival_time, next(self._counter))
        req.status = SequenceStatus.WAITING
        req.num_computed_tokens = 0

    def add_sequence(self, seq: Sequence) -> None:
        self._check_new(seq)
        self._register(seq)
        self.waiting.append(seq)

    def add_sequence_group(self, seqs: list[Sequence]) -> None:
        """n > 1 samples of one prompt: prefill once (the first sequence), fork, copy-on-write."""
        if not seqs:
            raise ValueError("seqs: empty group")
        if len(seqs) > self.max_num_seqs:
            raise ValueError(f"n: {len(seqs)} exceeds max_num_seqs ({self.max_num_seqs})")
        ids = {r.seq_id for r in seqs}
        if len(ids) != len(seqs):
            raise ValueError("seq_id: duplicate ids in the group")
        leader, members = seqs[0], list(seqs[1:])
        for r in seqs:
            self._check_new(r)
            if r.prompt_token_ids != leader.prompt_token_ids or r.output_token_ids:
                raise ValueError("prompt_token_ids: a group's sequences share one prompt and have no output yet")
        for r in seqs:
            self._register(r)
        if members:
            self._pending[leader.seq_id] = members
            self._prefill_target[leader.seq_id] = leader.num_prompt_tokens - 1
            self._num_pending += len(members)
            for m in members:
                self._leader_of[m.seq_id] = leader.seq_id
        self.waiting.append(leader)

    def fork_sequence(self, parent_id: str, child_id: str, sampling_params=None,
                      arrival_time: float | None = None) -> Sequence:
        """Beam search: a new sequence `child_id` continuing `parent_id` (same prompt and output
        tokens, the parent's sampling params unless given, the parent's arrival time unless given).

        A running parent's blocks are shared (refcount + 1; the next write into a shared,
        partly filled block is a copy-on-write). Without a free seat, or when the parent is
        not running, the child waits at the front of the queue and recomputes (the prefix
        cache usually serves most of it).
        """
        parent = self.seqs.get(parent_id)
        if parent is None:
            raise ValueError(f"parent_id: no unfinished sequence {parent_id!r}")
        if child_id in self.seqs:
            raise ValueError(f"seq_id: {child_id!r} is already in the scheduler")
        child = parent.continuation(child_id, sampling_params)
        if arrival_time is not None:
            child.arrival_time = arrival_time
        self._register(child)
        bm = self.block_manager
        if (parent.status is SequenceStatus.RUNNING and bm.has_table(parent_id)
                and len(self.running) + self._reserved_seats < self.max_num_seqs):
            bm.fork(parent_id, child.seq_id)
            child.num_computed_tokens = parent.num_computed_tokens
            child.num_cached_tokens = parent.num_cached_tokens
            child.status = SequenceStatus.RUNNING
            self._insert_running(child)
        else:
            self.waiting.appendleft(child)
        return child

    # ---- queries -----------------------------------------------------------------------
    def get_sequence(self, seq_id: str) -> Sequence | None:
        """An unfinished sequence (finished ones are forgotten: None)."""
        return self.seqs.get(seq_id)

    def has_unfinished_sequences(self) -> bool:
        return bool(self.seqs)

    def stats(self) -> SchedulerStats:
        bm = self.block_manager
        return SchedulerStats(
            num_running=len(self.running), num_waiting=len(self.waiting) + self._num_pending,
            kv_cache_usage=bm.usage, prefix_cache_queries=self.prefix_cache_queries,
            prefix_cache_hits=self.prefix_cache_hits, num_preemptions=self.num_preemptions,
            num_free_blocks=bm.num_free_blocks, num_total_blocks=bm.num_total_blocks)

    # ---- the step ----------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        bm = self.block_manager
        running = self.running
        target_of = self._prefill_target
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledSequence] = []
        copies: list[tuple[int, int]] = []
        preempted: list[str] = []
        finished: list[Sequence] = []

        # 1. running sequences, oldest first
        i = 0
        while i < len(running) and budget > 0:
            req = running[i]
            rid = req.seq_id
            start = req.num_computed_tokens
            num_tokens = len(req.prompt_token_ids) + len(req.output_token_ids)
            n = (target_of.get(rid, num_tokens) if target_of else num_tokens) - start
            if n <= 0:
                i += 1
                continue
            k = 0
            if n == 1 and req.spec_token_ids:
                # a decode with draft tokens: 1 + k query tokens, the drafts within the budget
                k = min(len(req.spec_token_ids), budget - 1)
                n += k
            if n > budget:
                n = budget
            cps = bm.append_slots(rid, start + n)
            if cps is None and k:
                k, n = 0, 1                 # no room for the drafts: plain decode before preempting anyone
                cps = bm.append_slots(rid, start + 1)
            while cps is None:
                victim = running[-1]
                if victim is req and len(running) == 1:
                    # alone in the pool and still too big: it can never run
                    self.finish_sequence(rid, SequenceStatus.FINISHED_LENGTH)
                    finished.append(req)
                    break
                self._preempt(victim)
                preempted.append(victim.seq_id)
                if victim is req:
                    break
                cps = bm.append_slots(rid, start + n)
            if cps is None:
                continue                    # req left `running`; index i now holds the next one
            if cps:
                copies.extend(cps)
            scheduled.append(ScheduledSequence(req, n, start, bm.get_table(rid), start + n - k == num_tokens, k))
            budget -= n
            i += 1

        # 2. admit waiting sequences, first come first served
        if not preempted:
            budget = self._admit(budget, scheduled, copies, finished)

        return SchedulerOutput(scheduled, self.max_num_batched_tokens - budget, copies, preempted, finished)

    def _admit(self, budget: int, scheduled: list, copies: list, finished: list) -> int:
        held = self._hold_unready()
        try:
            return self._admit_ready(budget, scheduled, copies, finished)
        finally:
            self.waiting.extendleft(reversed(held))      # back at the front, in their order

    def _hold_unready(self) -> list[Sequence]:
        """Takes the sequences whose grammar is still compiling, or whose LoRA adapter would exceed
        max_loras distinct adapters among running sequences, out of the queue (order kept)."""
        ready = [s.is_ready() for s in self.waiting]     # read once: a compile may finish meanwhile
        if self.max_loras is not None:
            ready = self._lora_fits(ready)
        if all(ready):
            return []
        held = [s for s, ok in zip(self.waiting, ready) if not ok]
        self.waiting = deque(s for s, ok in zip(self.waiting, ready) if ok)
        return held

    def _lora_fits(self, ready: list[bool]) -> list[bool]:
        """Adapters of waiting sequences claim the slots left by the running ones first come first
        served; a sequence whose adapter finds none waits (and does not block those behind it)."""
        active = {s.lora.key for s in self.running if s.lora is not None}
        out = []
        for s, ok in zip(self.waiting, ready):
            if ok and s.lora is not None and s.lora.key not in active:
                ok = len(active) < self.max_loras
                if ok:
                    active.add(s.lora.key)
            out.append(ok)
        return out

    def _admit_ready(self, budget: int, scheduled: list, copies: list, finished: list) -> int:
        bm = self.block_manager
        bs = self.block_size
        waiting = self.waiting
        while waiting and budget > 0:
            req = waiting[0]
            rid = req.seq_id
            members = self._pending.get(rid)
            seats = 1 + (len(members) if members else 0)
            if len(self.running) + self._reserved_seats + seats > self.max_num_seqs:
                break
            prefix = EMPTY_PREFIX
            if self.enable_prefix_caching and not req.skip_prefix_cache:
                prefix = bm.find_cached_prefix(req.all_token_ids, req.num_tokens, prefix_root(req))
            num_cached = prefix.num_blocks * bs
            n = min(self._prefill_target.get(rid, req.num_tokens) - num_cached, budget)
            if bm.allocate(rid, num_cached + n, prefix) is None:
                if not self.running:
                    # every block is free and it still does not fit: it never will
                    self.finish_sequence(rid, SequenceStatus.FINISHED_LENGTH)
                    finished.append(req)
                    continue
                break
            waiting.popleft()
            if self.enable_prefix_caching:
                self.prefix_cache_queries += req.num_tokens
                self.prefix_cache_hits += num_cached
            req.num_computed_tokens = num_cached
            req.num_cached_tokens = num_cached
            req.status = SequenceStatus.RUNNING
            self._insert_running(req)
            if members:
                self._reserved_seats += len(members)
            if n > 0:
                # (a leader's target is len(prompt) - 1, so it never samples before its group forks)
                scheduled.append(ScheduledSequence(req, n, num_cached, bm.get_table(rid),
                                                  num_cached + n == req.num_tokens))
                budget -= n
                continue
            # a leader whose prompt[:-1] was all cached: fork now; each computes the last token
            group = [req] + self._fork_group(req)
            for r in group:
                if budget <= 0:
                    break
                start = r.num_computed_tokens
                cps = bm.append_slots(r.seq_id, start + 1)
                if cps is None:
                    break                   # no preemption at admission: they run next step
                copies.extend(cps)
                scheduled.append(ScheduledSequence(r, 1, start, bm.get_table(r.seq_id),
                                                  start + 1 == r.num_tokens))
                budget -= 1
        return budget

    def update_from_output(self, out: SchedulerOutput) -> None:
        """Advances num_computed_tokens of the scheduled sequences; registers full blocks'
        hashes; forks n > 1 groups whose leader finished prompt[:-1]."""
        bm = self.block_manager
        caching = self.enable_prefix_caching
        targets = self._prefill_target
        bs = self.block_size
        running = SequenceStatus.RUNNING
        for sr in out.scheduled:
            req = sr.seq
            start = sr.start
            if req.status is not running or req.num_computed_tokens != start:
                continue                    # finished (aborted) since schedule()
            n = start + sr.num_new_tokens - sr.num_spec_tokens    # drafts count once accepted
            req.num_computed_tokens = n
            # a table's hashes always reach its first computed block, so only a block that
            # became full in this step can need one
            if caching and n // bs != start // bs:
                bm.cache_full_blocks(req.seq_id, req.all_token_ids, n, prefix_root(req))
            if targets and req.seq_id in targets and n >= targets[req.seq_id]:
                self._fork_group(req)

    def commit_spec_tokens(self, seq: Sequence, num_accepted: int) -> None:
        """After a verification step (update_from_output done, the accepted drafts and the target's
        token appended): the first num_accepted drafts' K/V join the computed tokens; the table
        shrinks to them (the slots of rejected drafts go back; their stale K/V is never read and is
        overwritten when those positions are computed) and full blocks get prefix hashes, accepted
        tokens only. A sequence that finished meanwhile already freed everything."""
        if seq.status is not SequenceStatus.RUNNING:
            return
        n = seq.num_computed_tokens + num_accepted
        if n >= seq.num_tokens:
            raise ValueError(f"num_accepted: {num_accepted} leaves no token to compute "
                             f"({seq.num_computed_tokens} computed of {seq.num_tokens})")
        seq.num_computed_tokens = n
        self.block_manager.truncate(seq.seq_id, n)
        if self.enable_prefix_caching:
            self.block_manager.cache_full_blocks(seq.seq_id, seq.all_token_ids, n, prefix_root(seq))

    def append_token(self, seq_id: str, token_id: int) -> None:
        self.seqs[seq_id].append_output_token(token_id)

    def finish_sequence(self, seq_id: str, status: SequenceStatus) -> None:
        """Finishes a sequence in any state (waiting, running, preempted, pending group member)
        and frees every block it holds. Unknown or already finished ids are ignored."""
        if not status.is_finished:
            raise ValueError(f"status: {status} is not a finished status")
        req = self.seqs.pop(seq_id, None)
        if req is None:
            return
        was_running = req.status is SequenceStatus.RUNNING
        if was_running:
            self.running.remove(req)
        elif seq_id in self._leader_of:
            leader_id = self._leader_of.pop(seq_id)
            self._pending[leader_id].remove(req)
            self._num_pending -= 1
            if self.seqs[leader_id].status is SequenceStatus.RUNNING:
                self._reserved_seats -= 1
            if not self._pending[leader_id]:
                del self._pending[leader_id]
                del self._prefill_target[leader_id]
        else:
            try:
                self.waiting.remove(req)
            except ValueError:
                pass
        self.block_manager.free(seq_id)
        self._age.pop(seq_id, None)
        req.status = status
        members = self._pending.pop(seq_id, None)
        if members:
            # a leader left before its group forked: the next member leads, from the queue front
            target = self._prefill_target.pop(seq_id)
            self._num_pending -= len(members)
            if was_running:
                self._reserved_seats -= len(members)
            new_leader, rest = members[0], members[1:]
            del self._leader_of[new_leader.seq_id]
            if rest:
                self._pending[new_leader.seq_id] = rest
                self._prefill_target[new_leader.seq_id] = target
                self._num_pending += len(rest)
                for m in rest:
                    self._leader_of[m.seq_id] = new_leader.seq_id
            self.waiting.appendleft(new_leader)

    # ---- internals ---------------------------------------------------------------------
    def _insert_running(self, req: Sequence) -> None:
        age = self._age
        bisect.insort(self.running, req, key=lambda r: age[r.seq_id])

    def _preempt(self, req: Sequence) -> None:
        """Preemption by recompute: free every block; resume later from scratch (outputs kept)."""
        rid = req.seq_id
        self.running.remove(req)
        self.block_manager.free(rid)
        req.status = SequenceStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        members = self._pending.get(rid)
        if members:
            self._reserved_seats -= len(members)
        self.waiting.appendleft(req)

    def _fork_group(self, leader: Sequence) -> list[Sequence]:
        """The pending members of leader's group share its table and start where it stands."""
        rid = leader.seq_id
        members = self._pending.pop(rid)
        del self._prefill_target[rid]
        self._num_pending -= len(members)
        self._reserved_seats -= len(members)
        for m in members:
            self.block_manager.fork(rid, m.seq_id)
            del self._leader_of[m.seq_id]
            m.num_computed_tokens = leader.num_computed_tokens
            m.num_cached_tokens = leader.num_cached_tokens
            m.status = SequenceStatus.RUNNING
            self._insert_running(m)
        return members


def prefix_root(seq: Sequence):
    """The root of a sequence's prefix-cache hash chain: its K/V depend on its adapter, if any."""
    return None if seq.lora is None else ("lora", seq.lora.key)
