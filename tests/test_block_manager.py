"""BlockManager: exact block ids, refcounts, LRU eviction order, COW copies; a random state machine."""
from __future__ import annotations

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import jaxpaged.block_manager as bm_mod
from jaxpaged.block_manager import BlockManager, cdiv


def toks(n, start=0):
    return list(range(start, start + n))


# ---- exact ids ---------------------------------------------------------------------------

def test_fresh_pool_and_allocation_order():
    bm = BlockManager(num_blocks=8, block_size=4)
    assert bm.num_total_blocks == 7 and bm.num_free_blocks == 7 and bm.num_used_blocks == 0
    assert bm.free_queue() == [1, 2, 3, 4, 5, 6, 7]
    assert bm.allocate("a", 5) == [1, 2]
    assert bm.allocate("b", 4) == [3]
    assert bm.allocate("c", 0) == []
    assert bm.free_queue() == [4, 5, 6, 7]
    assert bm.ref_cnt == [0, 1, 1, 1, 0, 0, 0, 0]
    assert bm.num_used_blocks == 3 and bm.usage == pytest.approx(3 / 7)
    bm.check_invariants()


def test_null_block_never_handed_out_and_out_of_blocks_is_a_condition():
    bm = BlockManager(num_blocks=5, block_size=2)
    assert bm.allocate("a", 8) == [1, 2, 3, 4]
    assert not bm.can_allocate(1)
    assert bm.allocate("b", 1) is None            # a condition, not an exception
    assert not bm.has_table("b")
    assert bm.append_slots("a", 9) is None        # would need a 5th block
    assert bm.get_table("a") == [1, 2, 3, 4] and bm.table_num_tokens("a") == 8
    assert bm.append_slots("a", 8) == []          # no growth needed
    bm.check_invariants()


def test_free_goes_to_tail_last_block_first():
    bm = BlockManager(num_blocks=8, block_size=4)
    bm.allocate("a", 12)                          # [1, 2, 3]
    bm.allocate("b", 4)                           # [4]
    assert bm.free("a") == 3
    assert bm.free_queue() == [5, 6, 7, 3, 2, 1]
    assert bm.free("a") == 0                      # unknown / already freed: no-op, no double free
    assert bm.allocate("c", 16) == [5, 6, 7, 3]
    bm.check_invariants()


def test_duplicate_table_and_bad_sizes_raise():
    bm = BlockManager(num_blocks=4, block_size=2)
    bm.allocate("a", 1)
    with pytest.raises(ValueError, match="seq_id"):
        bm.allocate("a", 1)
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(num_blocks=1, block_size=2)


# ---- prefix cache ------------------------------------------------------------------------

def test_prefix_lookup_never_covers_the_last_token():
    bm = BlockManager(num_blocks=8, block_size=4)
    t = toks(10)
    assert bm.allocate("a", 10) == [1, 2, 3]
    assert bm.cache_full_blocks("a", t, 10) == 2   # blocks 1 and 2 are full; 3 holds 2 tokens
    assert bm.num_cached_blocks == 2
    assert bm.find_cached_prefix(t).blocks == [1, 2]
    assert bm.find_cached_prefix(toks(9)).blocks == [1, 2]   # 8 cached, token 8 computed
    assert bm.find_cached_prefix(toks(8)).blocks == [1]      # all 8 cached: the last block is recomputed
    assert bm.find_cached_prefix(toks(20)).blocks == [1, 2]
    assert bm.find_cached_prefix(toks(10, start=1)).blocks == []
    assert bm.find_cached_prefix([0, 1, 2, 3, 9, 9, 9, 9, 9]).blocks == [1]
    assert bm.find_cached_prefix(t, num_tokens=5).blocks == [1]


def test_freed_cached_blocks_stay_findable_and_hits_revive_them():
    bm = BlockManager(num_blocks=8, block_size=4)
    t = toks(10)
    bm.allocate("a", 10)
    bm.cache_full_blocks("a", t, 10)
    bm.free("a")
    assert bm.free_queue() == [4, 5, 6, 7, 3, 2, 1]
    p = bm.find_cached_prefix(t + [99, 98])
    assert p.blocks == [1, 2]
    assert bm.can_allocate(12, p)
    assert bm.allocate("b", 12, p) == [1, 2, 4]   # hits revived, the fresh block from the head
    assert bm.ref_cnt[1] == bm.ref_cnt[2] == 1
    assert bm.free_queue() == [5, 6, 7, 3]
    # b's table already carries the prefix hashes: only block 3 (index 2) is new when full
    assert bm.cache_full_blocks("b", t + [99, 98], 12) == 1
    bm.check_invariants()


def test_hit_on_a_block_in_use_shares_it():
    bm = BlockManager(num_blocks=8, block_size=4)
    t = toks(8)
    bm.allocate("a", 8)
    bm.cache_full_blocks("a", t, 8)
    p = bm.find_cached_prefix(t + [50])
    assert p.blocks == [1, 2]
    assert bm.allocate("b", 9, p) == [1, 2, 3]
    assert bm.ref_cnt[:4] == [0, 2, 2, 1]
    bm.free("a")
    assert bm.ref_cnt[:4] == [0, 1, 1, 1] and 1 not in bm.free_queue()
    bm.check_invariants()


def test_eviction_order_is_lru_and_drops_hash_entries():
    bm = BlockManager(num_blocks=5, block_size=2)   # blocks 1..4
    t = toks(6)
    bm.allocate("a", 6)                              # [1, 2, 3]
    bm.cache_full_blocks("a", t, 6)
    bm.free("a")                                     # queue [4, 3, 2, 1]
    assert bm.free_queue() == [4, 3, 2, 1]
    assert bm.find_cached_prefix(t + [7]).blocks == [1, 2, 3]
    assert bm.allocate("x", 2) == [4]                # uncached block first
    assert bm.num_evicted_blocks == 0
    assert bm.allocate("y", 2) == [3]                # evicts a's third block
    assert bm.num_evicted_blocks == 1 and bm.block_hash(3) is None
    assert bm.find_cached_prefix(t + [7]).blocks == [1, 2]
    assert bm.allocate("z", 2) == [2]
    assert bm.find_cached_prefix(t + [7]).blocks == [1]
    assert bm.num_cached_blocks == 1
    bm.check_invariants()


def test_hit_then_free_moves_the_block_to_the_tail():
    bm = BlockManager(num_blocks=5, block_size=2)
    bm.allocate("a", 2)                              # [1]
    bm.allocate("b", 2)                              # [2]
    bm.cache_full_blocks("a", [5, 5], 2)
    bm.cache_full_blocks("b", [6, 6], 2)
    bm.free("a")
    bm.free("b")
    assert bm.free_queue() == [3, 4, 1, 2]
    p = bm.find_cached_prefix([5, 5, 0])
    assert bm.allocate("c", 3, p) == [1, 3]
    bm.free("c")
    assert bm.free_queue() == [4, 2, 3, 1]           # block 1 (used most recently) is evicted last


def test_same_prefix_computed_twice_keeps_the_first_registration():
    bm = BlockManager(num_blocks=8, block_size=2)
    bm.allocate("a", 4)
    bm.allocate("b", 4)
    bm.cache_full_blocks("a", [1, 2, 3, 4], 4)
    bm.cache_full_blocks("b", [1, 2, 3, 4], 4)
    assert bm.num_cached_blocks == 2
    assert bm.block_hash(3) is None and bm.block_hash(4) is None
    bm.free("a")
    bm.free("b")
    assert bm.find_cached_prefix([1, 2, 3, 4, 5]).blocks == [1, 2]
    bm.check_invariants()


def test_hash_collision_cannot_return_wrong_blocks(monkeypatch):
    monkeypatch.setattr(bm_mod, "hash_block", lambda parent, tokens: 42)
    bm = BlockManager(num_blocks=8, block_size=2)
    bm.allocate("a", 2)
    bm.cache_full_blocks("a", [1, 2], 2)
    assert bm.find_cached_prefix([1, 2, 0]).blocks == [1]
    assert bm.find_cached_prefix([3, 4, 0]).blocks == []


def test_prefix_caching_disabled():
    bm = BlockManager(num_blocks=8, block_size=2, enable_prefix_caching=False)
    bm.allocate("a", 4)
    assert bm.cache_full_blocks("a", [1, 2, 3, 4], 4) == 0
    assert bm.find_cached_prefix([1, 2, 3, 4, 5]).blocks == []


def test_reset_prefix_cache_forgets_only_free_blocks():
    bm = BlockManager(num_blocks=8, block_size=2)
    bm.allocate("a", 4)
    bm.allocate("b", 2)
    bm.cache_full_blocks("a", [1, 2, 3, 4], 4)
    bm.cache_full_blocks("b", [7, 7], 2)
    bm.free("a")
    assert bm.reset_prefix_cache() == 2
    assert bm.num_cached_blocks == 1 and bm.block_hash(3) is not None
    bm.check_invariants()


# ---- fork and copy-on-write --------------------------------------------------------------

def test_fork_shares_and_cow_copies_the_partial_block():
    bm = BlockManager(num_blocks=8, block_size=4)
    bm.allocate("a", 6)                              # [1, 2], block 2 holds 2 tokens
    assert bm.fork("a", "b") == [1, 2]
    assert bm.ref_cnt[:3] == [0, 2, 2]
    assert bm.num_used_blocks == 2
    assert bm.append_slots("b", 7) == [(2, 3)]       # b writes position 6 into shared block 2
    assert bm.get_table("b") == [1, 3]
    assert bm.ref_cnt[:4] == [0, 2, 1, 1]
    assert bm.append_slots("a", 7) == []             # a owns block 2 alone now: no copy
    assert bm.get_table("a") == [1, 2]
    assert bm.append_slots("a", 9) == []             # grows into a new block 4
    assert bm.get_table("a") == [1, 2, 4]
    bm.free("a")
    assert bm.ref_cnt[:5] == [0, 1, 0, 1, 0]
    assert bm.free_queue() == [5, 6, 7, 4, 2]
    bm.check_invariants()


def test_fork_at_block_boundary_needs_no_copy():
    bm = BlockManager(num_blocks=8, block_size=4)
    bm.allocate("a", 8)
    bm.fork("a", "b")
    assert bm.append_slots("b", 9) == []
    assert bm.get_table("b") == [1, 2, 3]
    assert bm.ref_cnt[:4] == [0, 2, 2, 1]


def test_cow_chain_of_four_sharers():
    bm = BlockManager(num_blocks=8, block_size=4)
    bm.allocate("s0", 7)                             # [1, 2]
    for k in (1, 2, 3):
        bm.fork("s0", f"s{k}")
    assert bm.ref_cnt[:3] == [0, 4, 4]
    copies = [bm.append_slots(f"s{k}", 8) for k in range(4)]
    assert copies == [[(2, 3)], [(2, 4)], [(2, 5)], []]   # the last holder writes in place
    assert [bm.get_table(f"s{k}") for k in range(4)] == [[1, 3], [1, 4], [1, 5], [1, 2]]
    assert bm.num_used_blocks == 5                   # 4 separate sequences would hold 8
    bm.check_invariants()


def test_cow_without_a_free_block_returns_none_and_changes_nothing():
    bm = BlockManager(num_blocks=3, block_size=4)    # blocks 1, 2
    bm.allocate("a", 6)                              # [1, 2]
    bm.fork("a", "b")
    assert bm.append_slots("b", 7) is None
    assert bm.get_table("b") == [1, 2] and bm.ref_cnt[:3] == [0, 2, 2]
    bm.free("a")
    assert bm.append_slots("b", 7) == []
    bm.check_invariants()


# ---- random state machine ----------------------------------------------------------------

BS = 2
NUM_BLOCKS = 14
VOCAB = st.integers(0, 1)          # tiny vocabulary: prefix hits are frequent


class BlockManagerMachine(RuleBasedStateMachine):
    """Random allocate / append / fork / free / evict, with a model of the KV content.

    `kv` holds what each physical block contains (written tokens and COW copies), so the
    checks cover sharing too: every sequence reads exactly its own tokens through its table,
    and a prefix hit returns blocks holding the looked-up tokens.
    """

    @initialize()
    def setup(self):
        self.bm = BlockManager(NUM_BLOCKS, BS)
        self.seqs: dict[str, list[int]] = {}
        self.kv: dict[int, list] = {b: [None] * BS for b in range(NUM_BLOCKS)}
        self.next_id = 0

    def _new_id(self):
        self.next_id += 1
        return f"s{self.next_id}"

    def _write(self, sid, tokens, start, end):
        table = self.bm.get_table(sid)
        for p in range(start, end):
            b = table[p // BS]
            assert self.bm.ref_cnt[b] == 1, f"write into shared block {b}"
            assert self.bm.block_hash(b) is None, f"write into cached block {b}"
            self.kv[b][p % BS] = tokens[p]

    def _base_tokens(self, data, n):
        """Tokens that often share a prefix with an existing sequence."""
        if self.seqs and data.draw(st.booleans()):
            other = data.draw(st.sampled_from(sorted(self.seqs)))
            head = self.seqs[other][:data.draw(st.integers(0, n))]
        else:
            head = []
        return head + data.draw(st.lists(VOCAB, min_size=n - len(head), max_size=n - len(head)))

    @rule(n=st.integers(0, 11), use_cache=st.booleans(), data=st.data())
    def allocate(self, n, use_cache, data):
        tokens = self._base_tokens(data, n)
        prefix = self.bm.find_cached_prefix(tokens) if use_cache else bm_mod.EMPTY_PREFIX
        ncached = prefix.num_blocks * BS
        assert ncached <= max(n - 1, 0)
        sid = self._new_id()
        free_before = self.bm.num_free_blocks
        fits = self.bm.can_allocate(n, prefix)
        got = self.bm.allocate(sid, n, prefix)
        if got is None:
            assert not fits and self.bm.num_free_blocks == free_before and not self.bm.has_table(sid)
            return
        for i, b in enumerate(prefix.blocks):       # a hit holds the looked-up tokens
            assert self.kv[b] == tokens[i * BS:(i + 1) * BS]
        self._write(sid, tokens, ncached, n)
        self.seqs[sid] = tokens

    @precondition(lambda self: self.seqs)
    @rule(k=st.integers(1, 5), data=st.data())
    def append(self, k, data):
        sid = data.draw(st.sampled_from(sorted(self.seqs)))
        tokens = self.seqs[sid]
        new = data.draw(st.lists(VOCAB, min_size=k, max_size=k))
        free_before = self.bm.num_free_blocks
        table_before = list(self.bm.get_table(sid))
        copies = self.bm.append_slots(sid, len(tokens) + k)
        if copies is None:
            assert self.bm.num_free_blocks == free_before and self.bm.get_table(sid) == table_before
            return
        for src, dst in copies:                      # the runner's copies, before the writes
            self.kv[dst] = list(self.kv[src])
        start = len(tokens)
        tokens.extend(new)
        self._write(sid, tokens, start, len(tokens))

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def fork(self, data):
        sid = data.draw(st.sampled_from(sorted(self.seqs)))
        child = self._new_id()
        used_before = self.bm.num_used_blocks
        self.bm.fork(sid, child)
        assert self.bm.num_used_blocks == used_before   # sharing costs no block
        self.seqs[child] = list(self.seqs[sid])

    @precondition(lambda self: self.seqs)
    @rule(data=st.data(), twice=st.booleans())
    def free(self, data, twice):
        sid = data.draw(st.sampled_from(sorted(self.seqs)))
        self.bm.free(sid)
        del self.seqs[sid]
        if twice:
            assert self.bm.free(sid) == 0

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def register(self, data):
        sid = data.draw(st.sampled_from(sorted(self.seqs)))
        self.bm.cache_full_blocks(sid, self.seqs[sid], len(self.seqs[sid]))

    @rule(n=st.integers(1, NUM_BLOCKS))
    def evict(self, n):
        """Take n blocks from the free queue head (evicting cached ones), then give them back."""
        n = min(n, self.bm.num_free_blocks)
        head = self.bm.free_queue()[:n]
        if self.bm.allocate("_evict", n * BS) is None:
            return
        assert self.bm.get_table("_evict") == head
        assert all(self.bm.block_hash(b) is None for b in head)
        self.bm.free("_evict")

    @rule()
    def reset(self):
        self.bm.reset_prefix_cache()

    @rule(data=st.data(), n=st.integers(0, 12))
    def lookup(self, data, n):
        tokens = self._base_tokens(data, n)
        p = self.bm.find_cached_prefix(tokens)
        assert p.num_blocks <= max(n - 1, 0) // BS
        for i, b in enumerate(p.blocks):
            assert self.kv[b] == tokens[i * BS:(i + 1) * BS]

    @invariant()
    def consistent(self):
        bm = self.bm
        bm.check_invariants()      # free + used == total, refcounts == table membership, no null block
        assert bm.num_free_blocks + bm.num_used_blocks == bm.num_total_blocks
        assert sorted(bm.table_ids()) == sorted(self.seqs)
        for sid, tokens in self.seqs.items():
            table = bm.get_table(sid)
            assert len(table) == cdiv(len(tokens), BS)
            assert bm.table_num_tokens(sid) == len(tokens)
            for p, t in enumerate(tokens):
                assert self.kv[table[p // BS]][p % BS] == t, f"{sid} reads a wrong token at {p}"


TestBlockManagerMachine = BlockManagerMachine.TestCase
TestBlockManagerMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None,
                                            suppress_health_check=[HealthCheck.too_slow])


# ---- the memory figure (python -m jaxpaged.kv_memory_report) -------------------------------

def test_memory_report_figures():
    from jaxpaged import kv_memory_report as rep
    u = rep.utilization(num_requests=40, block_size=16, max_model_len=2048, seed=1)
    assert u["paged"] >= 0.96 and u["final_paged"] >= 0.96
    assert u["reserved"] < 0.7
    r = rep.sharing(prompt_len=512, output_len=16, n=4, block_size=16)
    # prompt[:-1] = 511 tokens = 31 full blocks shared + 4 own last blocks (COW), vs 4 * 32
    assert (r["group_after_prompt"], r["separate_after_prompt"]) == (35, 128)
    assert r["saved_peak"] == 3 * 31
