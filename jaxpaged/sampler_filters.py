"""Temperature, min-p / top-k / top-p and the draw, without sorting the vocabulary (device side of sampler.py).

Rows arrive as logits x [B, V] f32 after penalties, logit_bias, bans and grammar masks. Per sampled row
(greedy and padding rows are the caller's; here they just ride along with temperature 1):

  s = x * (1 / temperature): one f32 factor per row, so every piece below computes the same s (XLA turns a
    division by a broadcast into this product anyway); the order of s is the order of x.

  candidates: the NC = topk_cap largest values and their ids, with one pass over the row: the maxima of
    groups of CAND_GROUP tokens, the NC groups with the largest maxima (lax.top_k over [B, G]), then
    lax.top_k over those groups' members [B, NC * CAND_GROUP]. Exact: with T the NC-th largest group
    maximum, every value > T sits in a group whose max is > T (all picked), and the picked groups whose
    max equals T hold enough copies of T for the rest.

  threshold thr, keep s >= thr (ties at thr are kept; vLLM's rules otherwise):
    min-p  s >= max + log(min_p);
    top-k  s >= the k-th largest;
    top-p  the smallest set of the most likely tokens of the min-p/top-k-filtered distribution whose mass
           reaches p (a token stays while the mass of the tokens before it is < p).
    The candidates give them all, except: a top_k above NC (exact k-th largest by a 32-step bisection of
    counts over the f32 bit patterns), the top-p mass when min-p/top-k leave more than the candidates
    (one exp pass over the row), a nucleus wider than the candidates (32-step bisection of mass).

  fits: the kept set lies inside the candidates (the last candidate is below thr, or V <= NC). Such a row
    draws among its NC candidates by inverse CDF with its first uniform: no further pass over V. Other rows
    (temperature only, min-p alone, wide top-k / top-p) draw over the whole row by a two-level inverse CDF
    (groups of GROUP tokens, then one group) on exp(s - max) where s >= thr.

Every full-row piece runs under lax.cond only when some row needs it, so top_k <= NC - 1 (with or without
top_p / min_p) costs one pass over [B, V] plus work on [B, NC * CAND_GROUP]. Which computation a row uses
depends on that row alone (`fits`, `complete`), never on the rest of the batch, so a seeded row draws the
same token whatever it is batched with.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

GROUP = 256             # tokens per group in the two-level inverse-CDF draw over a whole row
CAND_GROUP = 32         # tokens per group when finding the candidates
DEFAULT_TOPK_CAP = 128  # candidates per row: top_k <= 127 and nuclei inside them never touch V again


class Filtered(NamedTuple):
    """What the filters decided, per row."""
    cand: jax.Array   # [B, NC] f32 the NC largest scaled logits s, descending
    ids: jax.Array    # [B, NC] i32 their token ids
    m: jax.Array      # [B] f32 row max of s
    thr: jax.Array    # [B] f32 keep s >= thr (-inf: keep everything)
    fits: jax.Array   # [B] bool the kept set lies inside the candidates
    inv_t: jax.Array  # [B] f32 1 / temperature (1 on greedy / padding rows): s = x * inv_t


def candidates(x: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
    """The n largest values of each row of x [B, V] (descending) and their ids, both [B, n]."""
    B, V = x.shape
    C = CAND_GROUP
    G = -(-V // C)
    if G <= 2 * n:                      # small vocabulary: one top_k over the row is as cheap
        _, ids = jax.lax.top_k(x, n)
        return jnp.take_along_axis(x, ids, axis=-1), ids.astype(jnp.int32)
    if G * C != V:
        x = jnp.pad(x, ((0, 0), (0, G * C - V)), constant_values=-jnp.inf)
    xg = x.reshape(B, G, C)                                             # token g * C + c
    _, groups = jax.lax.top_k(jnp.max(xg, axis=-1), n)                  # [B, n] best group maxima
    members = jnp.take_along_axis(xg, groups[:, :, None], axis=1)       # [B, n, C]
    members = members.reshape(B, n * C)                                 # position i * C + c
    _, pos = jax.lax.top_k(members, n)                                  # [B, n]
    # values read back through the indices (a values-only top_k can become a full sort on XLA:CPU)
    vals = jnp.take_along_axis(members, pos, axis=-1)
    ids = jnp.take_along_axis(groups, pos // C, axis=-1) * C + pos % C
    return vals, jnp.minimum(ids, V - 1).astype(jnp.int32)   # padding ids only ever carry -inf


def filter_rows(x: jax.Array, t, greedy: jax.Array, cap: int = DEFAULT_TOPK_CAP) -> Filtered:
    """Thresholds of every row of x [B, V] (t: SamplingTensors; greedy [B] rows are left unfiltered)."""
    B, V = x.shape
    n = min(cap, V)
    inv_t = 1.0 / jnp.where(greedy, 1.0, t.temperature)                # [B]
    k, p = t.top_k, t.top_p
    if V > n:   # no row filters (temperature only): the candidates are not needed, only the row max
        def row_max():
            return jnp.broadcast_to(jnp.max(x, axis=-1, keepdims=True), (B, n)), jnp.zeros((B, n), jnp.int32)
        any_filter = jnp.any(~greedy & ((k > 0) | (p < 1.0) | (t.min_p > 0)))
        vals, ids = jax.lax.cond(any_filter, lambda: candidates(x, n), row_max)
    else:
        vals, ids = candidates(x, n)
    cand = vals * inv_t[:, None]                                        # == s at ids
    m = cand[:, 0]
    use_p = ~greedy & (p < 1.0)
    wide_k = ~greedy & (k > n)                                          # k-th largest beyond the candidates
    thr_min_p = jnp.where(t.min_p > 0, m + jnp.log(jnp.maximum(t.min_p, 1e-30)), -jnp.inf)
    kth = jnp.take_along_axis(cand, jnp.clip(k - 1, 0, n - 1)[:, None], axis=-1)[:, 0]
    thr1 = jnp.maximum(jnp.where((k > 0) & (k <= n), kth, -jnp.inf), thr_min_p)
    # rows whose min-p/top-k set lies inside the candidates
    complete = ~wide_k & (thr1 > cand[:, -1]) if V > n else jnp.ones((B,), bool)
    e_c = jnp.where(cand >= thr1[:, None], jnp.exp(cand - m[:, None]), 0.0)   # [B, n]

    def full_mass():
        """Exact thr1 for wide top-k rows, and the min-p/top-k-kept mass over the whole row."""
        s = x * inv_t[:, None]
        keys = _sortable(s)
        kth_full = jax.lax.cond(jnp.any(wide_k), lambda: _unsortable(_bisect(
            keys, jnp.ones_like(s), k.astype(jnp.float32), jnp.min(keys, -1), jnp.max(keys, -1))), lambda: m)
        thr1_full = jnp.where(wide_k, jnp.maximum(kth_full, thr_min_p), thr1)
        z = jnp.sum(jnp.where(s >= thr1_full[:, None], jnp.exp(s - m[:, None]), 0.0), axis=-1)
        return thr1_full, z

    thr1, z_full = jax.lax.cond(jnp.any((use_p & ~complete) | wide_k), full_mass,
                                lambda: (thr1, jnp.ones((B,), jnp.float32)))
    z = jnp.where(complete, jnp.sum(e_c, axis=-1), z_full)
    pc = jnp.where(cand >= thr1[:, None], e_c, 0.0) / z[:, None]        # candidates' filtered probs
    incl = jnp.cumsum(pc, axis=-1)
    n_keep = jnp.sum(incl - pc < p[:, None], axis=-1)                   # vLLM: mass before the token < p
    last = jnp.take_along_axis(cand, jnp.clip(n_keep - 1, 0, n - 1)[:, None], axis=-1)[:, 0]
    thr = jnp.maximum(thr1, jnp.where(use_p, last, -jnp.inf))
    # the nucleus reaches past the candidates: every candidate was kept (the last one's prior mass < p)
    wide_p = use_p & ~complete & (n_keep >= n) if V > n else jnp.zeros((B,), bool)

    def exact_top_p():
        s = x * inv_t[:, None]
        keys = _sortable(s)
        w = jnp.where(s >= thr1[:, None], jnp.exp(s - m[:, None]), 0.0)
        w = w / jnp.sum(w, axis=-1, keepdims=True)
        lo = jnp.min(keys, axis=-1)
        hi = jnp.minimum(jnp.max(keys, axis=-1), _sortable(cand[:, -1]))   # the threshold is <= the last candidate
        return jnp.where(wide_p, jnp.maximum(thr1, _unsortable(_bisect(keys, w, p, lo, hi))), thr)

    thr = jax.lax.cond(jnp.any(wide_p), exact_top_p, lambda: thr)
    fits = (thr > cand[:, -1]) if V > n else jnp.ones((B,), bool)
    return Filtered(cand, ids, m, thr, fits, inv_t)


def draw(x: jax.Array, f: Filtered, uniforms: jax.Array, sampled: jax.Array) -> jax.Array:
    """[B] i32 token per row: among its candidates when the kept set fits, else over the whole row.
    uniforms [B, 2] in [0, 1); sampled [B] bool: rows that draw at all (others return anything)."""
    w_c = jnp.where(f.cand >= f.thr[:, None], jnp.exp(f.cand - f.m[:, None]), 0.0)   # [B, NC]
    in_cands = jnp.take_along_axis(f.ids, _search(w_c, uniforms[:, 0])[:, None], axis=-1)[:, 0]

    def whole_row():
        s = x * f.inv_t[:, None]
        w = jnp.where(s >= f.thr[:, None], jnp.exp(s - f.m[:, None]), 0.0)
        return _categorical(w, uniforms)

    over_v = jax.lax.cond(jnp.any(sampled & ~f.fits), whole_row, lambda: jnp.zeros_like(in_cands))
    return jnp.where(f.fits, in_cands, over_v)


def filtered_logits(x: jax.Array, f: Filtered) -> jax.Array:
    """[B, V] f32 the scaled logits s where kept, -inf elsewhere (one pass; for callers needing the
    whole processed distribution, e.g. speculative decoding's rejection sampling)."""
    s = x * f.inv_t[:, None]
    return jnp.where(s >= f.thr[:, None], s, -jnp.inf)


def _bisect(keys, w, target, lo, hi):
    """Per row, the largest key k in [lo, hi] with sum(w[keys >= k]) >= target (lo when none)."""
    def body(_, carry):
        lo, hi = carry
        # mid = lo + ceil((hi - lo) / 2) in uint32 arithmetic (the range can exceed int32)
        d = hi.astype(jnp.uint32) - lo.astype(jnp.uint32)
        mid = (lo.astype(jnp.uint32) + (d >> 1) + (d & 1)).astype(jnp.int32)
        ok = jnp.sum(jnp.where(keys >= mid[:, None], w, 0.0), axis=-1) >= target
        ok = ok & (hi > lo)
        return jnp.where(ok, mid, lo), jnp.where(ok | (hi <= lo), hi, mid - 1)

    lo, _ = jax.lax.fori_loop(0, 32, body, (lo, hi))
    return lo


def _sortable(x):
    """f32 -> i32 with the same order (negative floats have their magnitude bits flipped)."""
    i = jax.lax.bitcast_convert_type(x, jnp.int32)
    return jnp.where(i < 0, i ^ 0x7FFFFFFF, i)


def _unsortable(k):
    return jax.lax.bitcast_convert_type(jnp.where(k < 0, k ^ 0x7FFFFFFF, k), jnp.float32)


def _categorical(w: jax.Array, u: jax.Array) -> jax.Array:
    """Draws index i with probability w[b, i] / sum(w[b]) by a two-level inverse CDF. w [B, V] >= 0 with
    a positive entry per row; u [B, 2] uniforms in [0, 1)."""
    B, V = w.shape
    C = min(GROUP, V)
    G = -(-V // C)
    if G * C != V:
        w = jnp.pad(w, ((0, 0), (0, G * C - V)))
    wg = w.reshape(B, G, C)
    gs = jnp.sum(wg, axis=-1)                                         # [B, G] group masses
    g = _search(gs, u[:, 0])
    row = jnp.take_along_axis(wg, g[:, None, None], axis=1)[:, 0]     # [B, C]
    j = _search(row, u[:, 1])
    return (g * C + j).astype(jnp.int32)


def _search(w: jax.Array, u: jax.Array) -> jax.Array:
    """First index whose inclusive cumsum exceeds u * total, never an index of zero weight."""
    n = w.shape[1]
    c = jnp.cumsum(w, axis=-1)
    idx = jnp.sum(c <= (u * c[:, -1])[:, None], axis=-1)
    last_pos = n - 1 - jnp.argmax((w > 0)[:, ::-1], axis=-1)          # rounding guard
    return jnp.minimum(idx, last_pos).astype(jnp.int32)
