"""The runner's explicit table of compiled shapes: (token bucket T, sequence bucket B) pairs.

JAX compiles once per input shape. Every step pads its flat token count up to a token bucket and its
sequence count up to a sequence bucket; `warmup()` compiles exactly this table, and a step that
needs a shape outside it is a bug (BucketError), never a silent recompile.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass


class BucketError(RuntimeError):
    """A step asked for a shape outside the compiled bucket table."""


def _geometric(lo: int, hi: int, factor: int) -> tuple[int, ...]:
    """lo, lo*factor, ... capped by hi, always ending with hi."""
    out, x = [], lo
    while x < hi:
        out.append(x)
        x *= factor
    out.append(hi)
    return tuple(sorted(set(out)))


@dataclass(frozen=True)
class BucketTable:
    token_buckets: tuple[int, ...]   # ascending; the last is max_num_batched_tokens
    seq_buckets: tuple[int, ...]     # ascending; the last is max_num_seqs (>= 2: see below)

    @classmethod
    def build(cls, max_num_batched_tokens: int, max_num_seqs: int) -> "BucketTable":
        # Sequence buckets start at min(4, max_num_seqs) and never below 2 (a batch of one runs in the
        # B = 2 bucket): a single-row bf16 matmul is pathologically slow on XLA CPU.
        # Both double: a decode step runs T = B rows through every matmul, so a batch of 20 runs as
        # (32, 32), not (64, 64) as with sequence buckets x4 (decode padding 2.4x -> 1.3x measured).
        max_seqs = max(2, min(max_num_seqs, max_num_batched_tokens))
        tokens = _geometric(min(16, max_num_batched_tokens), max_num_batched_tokens, 2)
        seqs = _geometric(min(4, max_seqs), max_seqs, 2)
        seqs = tuple(sorted(set(max(2, s) for s in seqs)))
        return cls(tokens, seqs)

    def pairs(self) -> list[tuple[int, int]]:
        """Every (T, B) the runner may compile: B <= T (a sequence brings >= 1 token) unless B is minimal."""
        return [(t, b) for t in self.token_buckets for b in self.seq_buckets
                if b <= t or b == self.seq_buckets[0]]

    def lookup(self, num_tokens: int, num_seqs: int) -> tuple[int, int]:
        """Smallest (T, B) with T >= num_tokens and B >= num_seqs."""
        ti = bisect.bisect_left(self.token_buckets, num_tokens)
        si = bisect.bisect_left(self.seq_buckets, num_seqs)
        if ti == len(self.token_buckets) or si == len(self.seq_buckets):
            raise BucketError(f"step of {num_tokens} tokens / {num_seqs} sequences is outside the bucket table "
                              f"(tokens {self.token_buckets}, seqs {self.seq_buckets})")
        t, b = self.token_buckets[ti], self.seq_buckets[si]
        if b > t:   # B <= T pairs only; the smallest token bucket that fits both
            t = self.token_buckets[bisect.bisect_left(self.token_buckets, b)]
        return t, b
