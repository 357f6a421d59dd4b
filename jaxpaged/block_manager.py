"""BlockManager: the physical KV blocks — refcounts, an LRU free queue, prefix hashes, fork, copy-on-write.

Pure Python, no jax. The KV cache holds `num_blocks` physical blocks of `block_size` token
slots; a token at position p of a sequence lives in slot
`table[p // block_size] * block_size + p % block_size`.

- Block 0 is the null block: padding tokens write there; it is never handed out, so
  `num_total_blocks == num_blocks - 1`.
- Every block has a reference count: the number of block tables that hold it (a table may
  be shared by fork: parallel sampling, beam search). A block with refcount 0 sits in the
  free queue.
- The free queue is LRU: freed blocks go to the tail, allocation takes from the head. A
  table is freed last block first, so a sequence's tail blocks are reused before its
  prefix (which other requests are likelier to share).
- Prefix caching: each FULL block of a sequence has a hash chained from its parent's,
  `hash((parent_hash, tuple(block_token_ids)))`; the first block's parent is the caller's `root`
  (None, or e.g. a LoRA adapter's key: chains of different roots never meet). Registered blocks stay findable while they
  sit in the free queue; a lookup hit on a free block revives it (refcount 1, out of the
  queue). When a cached free block is taken from the head for reuse, its hash entry is
  dropped. The stored token ids are compared on a hit, so a 64-bit collision between two
  different blocks with the same parent cannot return the wrong K/V.
- Copy-on-write: a table about to write into a partly filled block that other tables also
  hold gets a fresh block instead; the caller (the runner) copies src -> dst before the
  step writes.
- Running out of blocks is a condition: `allocate`/`append_slots` return None and change
  nothing; exceptions are only raised for misuse (unknown or duplicate table ids).

Invariants (checked by tests/test_block_manager.py after every operation of random
workloads): free + used == total; each block's refcount equals the number of tables that
hold it; a table covering n tokens holds exactly ceil(n / block_size) blocks; block 0 is in
no table; a registered hash maps to a block carrying that hash.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

NULL_BLOCK = 0


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def hash_block(parent_hash: int | None, token_ids: tuple[int, ...]) -> int:
    """The chained hash of one full block (parent_hash is None for the first block)."""
    return hash((parent_hash, token_ids))


@dataclass
class CachedPrefix:
    """Result of a prefix-cache lookup: the physical blocks holding the first num_tokens tokens."""
    blocks: list[int] = field(default_factory=list)
    hashes: list[int] = field(default_factory=list)  # the chained hash of each block

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)


EMPTY_PREFIX = CachedPrefix()


@dataclass
class BlockTable:
    """One sequence's blocks. `blocks` covers exactly ceil(num_tokens / block_size) blocks."""
    blocks: list[int]
    num_tokens: int = 0                                 # token slots the table covers
    hashes: list[int] = field(default_factory=list)     # chained hashes of its first len(hashes) (full) blocks


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 2:
            raise ValueError(f"num_blocks: must be >= 2 (block 0 is the null block), got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size: must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_cnt = [0] * num_blocks
        # per block: its registered hash and the (parent_hash, tokens) it was computed from
        self._block_hash: list[int | None] = [None] * num_blocks
        self._block_key: list[tuple | None] = [None] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(1, num_blocks))
        self._cached: dict[int, int] = {}               # hash -> block id
        self._tables: dict[str, BlockTable] = {}
        self.num_evicted_blocks = 0                     # cached blocks dropped by reuse (cumulative)

    # ---- sizes -------------------------------------------------------------------------
    @property
    def num_total_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        """Blocks with refcount 0 (cached-but-free ones included: they are reusable)."""
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_total_blocks - len(self._free)

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_total_blocks

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def blocks_for(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_size)

    def free_queue(self) -> list[int]:
        """Free block ids, head (next to be handed out) first. For tests and reports."""
        return list(self._free)

    def block_hash(self, block_id: int) -> int | None:
        return self._block_hash[block_id]

    # ---- tables ------------------------------------------------------------------------
    def has_table(self, seq_id: str) -> bool:
        return seq_id in self._tables

    def get_table(self, seq_id: str) -> list[int]:
        """The live block list of a sequence (read it; the manager mutates it)."""
        return self._tables[seq_id].blocks

    def table_num_tokens(self, seq_id: str) -> int:
        return self._tables[seq_id].num_tokens

    def table_ids(self) -> list[str]:
        return list(self._tables)

    # ---- prefix cache ------------------------------------------------------------------
    def find_cached_prefix(self, token_ids: list[int], num_tokens: int | None = None, root=None) -> CachedPrefix:
        """Longest run of cached full blocks holding a prefix of token_ids[:num_tokens].

        Never covers all num_tokens tokens: only tokens[:num_tokens - 1] are looked up, so
        the last token is always computed and its logits exist. No side effects. `root`: the
        first block's parent (what the sequence's K/V depend on besides its tokens, e.g. its adapter).
        """
        if not self.enable_prefix_caching:
            return EMPTY_PREFIX
        n = len(token_ids) if num_tokens is None else num_tokens
        bs = self.block_size
        out = CachedPrefix()
        parent = root
        for i in range((n - 1) // bs):
            toks = tuple(token_ids[i * bs:(i + 1) * bs])
            h = hash_block(parent, toks)
            b = self._cached.get(h)
            if b is None or self._block_key[b] != (parent, toks):
                break
            out.blocks.append(b)
            out.hashes.append(h)
            parent = h
        return out

    def cache_full_blocks(self, seq_id: str, token_ids: list[int], num_computed_tokens: int, root=None) -> int:
        """Registers the hashes of the sequence's blocks that are full of computed tokens.

        token_ids[:num_computed_tokens] must have their K/V in the table's blocks. Returns
        how many blocks were newly hashed. A block whose hash is already registered to
        another block (the same prefix computed twice) stays unregistered.
        """
        if not self.enable_prefix_caching:
            return 0
        t = self._tables[seq_id]
        bs = self.block_size
        full = min(num_computed_tokens, t.num_tokens) // bs
        start = len(t.hashes)
        if full <= start:
            return 0
        parent = t.hashes[-1] if t.hashes else root
        for i in range(start, full):
            toks = tuple(token_ids[i * bs:(i + 1) * bs])
            h = hash_block(parent, toks)
            t.hashes.append(h)
            b = t.blocks[i]
            if self._block_hash[b] is None and h not in self._cached:
                self._cached[h] = b
                self._block_hash[b] = h
                self._block_key[b] = (parent, toks)
            parent = h
        return full - start

    def reset_prefix_cache(self) -> int:
        """Forgets the hashes of all free blocks (blocks in use keep theirs). Returns how many."""
        n = 0
        for b in self._free:
            if self._block_hash[b] is not None:
                self._drop_hash(b)
                n += 1
        return n

    def _drop_hash(self, b: int) -> None:
        h = self._block_hash[b]
        if self._cached.get(h) == b:
            del self._cached[h]
        self._block_hash[b] = None
        self._block_key[b] = None

    # ---- allocation --------------------------------------------------------------------
    def _take(self) -> int:
        """Pops the head of the free queue; a cached block loses its hash entry."""
        b, _ = self._free.popitem(last=False)
        if self._block_hash[b] is not None:
            self._drop_hash(b)
            self.num_evicted_blocks += 1
        self.ref_cnt[b] = 1
        return b

    def _num_free_in(self, blocks: list[int]) -> int:
        rc = self.ref_cnt
        return sum(1 for b in blocks if rc[b] == 0)

    def can_allocate(self, num_tokens: int, prefix: CachedPrefix = EMPTY_PREFIX) -> bool:
        """Whether a new table covering num_tokens tokens (starting with `prefix`) fits now."""
        need = self.blocks_for(num_tokens) - prefix.num_blocks
        return need + self._num_free_in(prefix.blocks) <= len(self._free)

    def allocate(self, seq_id: str, num_tokens: int, prefix: CachedPrefix = EMPTY_PREFIX) -> list[int] | None:
        """Creates the table of seq_id covering num_tokens tokens, the first prefix.num_blocks
        blocks being the cached prefix (refcount up; free ones revived). None if it does not fit."""
        if seq_id in self._tables:
            raise ValueError(f"seq_id: {seq_id!r} already has a block table")
        if prefix.num_blocks * self.block_size > num_tokens:
            raise ValueError(f"num_tokens: {num_tokens} is less than the cached prefix "
                             f"({prefix.num_blocks} blocks)")
        if not self.can_allocate(num_tokens, prefix):
            return None
        blocks = []
        # revive the hits first, so taking fresh blocks from the head cannot evict them
        for b in prefix.blocks:
            if self.ref_cnt[b] == 0:
                del self._free[b]
            self.ref_cnt[b] += 1
            blocks.append(b)
        for _ in range(self.blocks_for(num_tokens) - len(blocks)):
            blocks.append(self._take())
        self._tables[seq_id] = BlockTable(blocks, num_tokens, list(prefix.hashes))
        return blocks

    def append_slots(self, seq_id: str, num_tokens: int) -> list[tuple[int, int]] | None:
        """Grows seq_id's table to cover num_tokens tokens, before writing positions
        [table.num_tokens, num_tokens).

        A block that will be written and is shared (refcount > 1) is replaced by a fresh
        one (copy-on-write). Returns the (src, dst) copies the runner must do before the
        step writes — usually [] — or None when the free blocks do not suffice (nothing
        changed then).
        """
        t = self._tables[seq_id]
        blocks = t.blocks
        bs = self.block_size
        have = len(blocks)
        need = (num_tokens + bs - 1) // bs - have
        first = t.num_tokens // bs          # first block written (exists iff partly filled)
        rc = self.ref_cnt
        if need <= 0 and (first >= have or rc[blocks[first]] == 1):
            # fast path (a decode token into an own, partly filled block)
            if num_tokens > t.num_tokens:
                t.num_tokens = num_tokens
            return []
        shared = [i for i in range(first, len(blocks)) if rc[blocks[i]] > 1]
        if max(need, 0) + len(shared) > len(self._free):
            return None
        copies = []
        for i in shared:
            src = blocks[i]
            dst = self._take()
            rc[src] -= 1                    # > 0: it was shared
            blocks[i] = dst
            copies.append((src, dst))
        for _ in range(need):
            blocks.append(self._take())
        if num_tokens > t.num_tokens:
            t.num_tokens = num_tokens
        return copies

    def truncate(self, seq_id: str, num_tokens: int) -> int:
        """Shrinks seq_id's table to cover num_tokens tokens (speculative decoding: the slots of rejected
        draft tokens go back). Blocks past ceil(num_tokens / block_size) are released as by free(),
        last first; hashes past the full blocks of num_tokens are dropped from the table. Returns how
        many blocks became free."""
        t = self._tables[seq_id]
        if not 0 <= num_tokens <= t.num_tokens:
            raise ValueError(f"num_tokens: {num_tokens} is not in [0, {t.num_tokens}] (the table's tokens)")
        keep = self.blocks_for(num_tokens)
        rc = self.ref_cnt
        n = 0
        while len(t.blocks) > keep:
            b = t.blocks.pop()
            rc[b] -= 1
            if rc[b] == 0:
                self._free[b] = None
                n += 1
        t.num_tokens = num_tokens
        del t.hashes[num_tokens // self.block_size:]
        return n

    def fork(self, parent_id: str, child_id: str) -> list[int]:
        """The child's table shares every block of the parent's (refcount + 1 each)."""
        if child_id in self._tables:
            raise ValueError(f"seq_id: {child_id!r} already has a block table")
        p = self._tables[parent_id]
        for b in p.blocks:
            self.ref_cnt[b] += 1
        self._tables[child_id] = BlockTable(list(p.blocks), p.num_tokens, list(p.hashes))
        return self._tables[child_id].blocks

    def free(self, seq_id: str) -> int:
        """Drops seq_id's table: refcount - 1 on each block, last block first; blocks reaching
        0 go to the tail of the free queue. Returns how many blocks became free (0 for a
        sequence without a table)."""
        t = self._tables.pop(seq_id, None)
        if t is None:
            return 0
        rc = self.ref_cnt
        n = 0
        for b in reversed(t.blocks):
            assert rc[b] > 0, f"double free of block {b}"
            rc[b] -= 1
            if rc[b] == 0:
                self._free[b] = None
                n += 1
        return n

    # ---- checking ----------------------------------------------------------------------
    def check_invariants(self) -> None:
        """Asserts the invariants in the module docstring (tests call this; O(total blocks))."""
        counts = [0] * self.num_blocks
        for sid, t in self._tables.items():
            assert len(t.blocks) == cdiv(t.num_tokens, self.block_size), \
                f"{sid}: {len(t.blocks)} blocks for {t.num_tokens} tokens"
            assert len(t.hashes) <= t.num_tokens // self.block_size
            for b in t.blocks:
                assert b != NULL_BLOCK, f"{sid} holds the null block"
                counts[b] += 1
        assert counts == self.ref_cnt, "refcounts differ from table membership"
        assert NULL_BLOCK not in self._free
        for b in self._free:
            assert self.ref_cnt[b] == 0, f"free block {b} has refcount {self.ref_cnt[b]}"
        used = sum(1 for b in range(1, self.num_blocks) if self.ref_cnt[b] > 0)
        assert used + len(self._free) == self.num_total_blocks, "free + used != total"
        for h, b in self._cached.items():
            assert self._block_hash[b] == h
