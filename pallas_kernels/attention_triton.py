"""Ragged paged attention on GPU (Pallas Triton): split-KV decode and query-block prefill, one launch.

Grid (NQB + B * S, KVH): program p of KV head h takes one of two roles.
- p < NQB, prefill: query block p of the batch's prefill sequences (q_len > TD). The wrapper
  numbers the blocks of all such sequences (`_prefill_blocks`, longest causal prefix first within a
  sequence); the block's TQ tokens x Gp heads walk the KV chunks up to their causal limit with an
  online softmax and store their rows of `o_rows` (rows of other sequences masked off).
- p >= NQB, decode (flash-decoding): (sequence b, segment s) = divmod(p - NQB, S). A sequence
  with 0 < q_len <= TD splits its KV chunks into S equal runs; segment s walks run s and writes
  its partial (acc, m, l). The wrapper combines the S partials (`_combine`, an XLA epilogue):
  small batches and long contexts fill the GPU with B * KVH * S programs instead of B * KVH.
Decode and prefill rows are told apart on the device from query_start (no host order needed).

Shapes are powers of two where Triton needs them: the GQA group is zero-padded to Gp, head_dim to
Dp (the cache is read with clamped columns; q's padding columns are zero, so they add nothing),
and a KV chunk is C positions whatever the page size (position j -> page bt[b, j // BS], row
j % BS; the table entries of a chunk are read once and shared by K and V).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from pallas_kernels.attention_reference import token_sequences

_MASK_VALUE = -1e30        # finite "minus infinity": keeps exp(m_old - m_new) NaN-free
DEFAULT_NUM_SMS = 132      # H100 / H200 SXM; the split count targets ~2 programs per SM


@dataclasses.dataclass(frozen=True)
class GpuTiling:
    """Static tile sizes of the GPU kernel (hashable: part of the jit cache key)."""
    q_block: int         # TQ: tokens per prefill query block; rows = TQ * Gp
    decode_tokens: int   # TD: sequences with q_len <= TD take the split-KV decode path; rows = TD * Gp
    kv_chunk: int        # C: KV positions per loop step (power of two, independent of the page size)
    kv_splits: int       # S: KV segments per decoding (sequence, KV head)
    group: int           # Gp: GQA group padded to a power of two
    head_dim: int        # Dp: head_dim padded to a power of two (>= 16)
    num_warps: int = 4
    num_stages: int = 3  # software pipelining depth of the KV loop (Triton) / SMEM ring slots (Mosaic)
    kernel: str = "triton"   # "triton" (this module) or "mosaic" (attention_mosaic, jax >= 0.11)
    compute_wgs: int = 1     # Mosaic only: consumer warpgroups, each taking every compute_wgs-th KV chunk


def choose_kv_splits(batch: int, num_kv_heads: int, max_context: int, kv_chunk: int,
                     num_sms: int = DEFAULT_NUM_SMS, min_chunks_per_split: int = 4, max_splits: int = 64,
                     programs_per_sm: int = 2) -> int:
    """Segments per decode: enough programs for ~programs_per_sm per SM (Triton 2; Mosaic GPU 1, whose
    ~190 KB of SMEM fits one program per SM), each segment >= min_chunks_per_split chunks.

    Static per bucket (batch and table width are the bucket's shapes): batch 1 x 32k x 8 KV heads
    -> 64 splits (512 programs; Mosaic 32); batch 64 x 8 KV heads -> 1 (512 programs already)."""
    want = -(-programs_per_sm * num_sms // max(1, batch * num_kv_heads))
    splits = pl.next_power_of_2(want)
    chunks = -(-max_context // kv_chunk)
    return int(max(1, min(splits, max_splits, chunks // min_chunks_per_split)))


def gpu_tiling(num_heads: int, num_kv_heads: int, head_dim: int, batch: int, max_context: int,
               num_sms: int = DEFAULT_NUM_SMS) -> GpuTiling:
    gp = max(pl.next_power_of_2(num_heads // num_kv_heads), 1)
    dp = max(pl.next_power_of_2(head_dim), 16)
    chunk = 64 if dp <= 128 else 32             # K + V chunk of 32 KB (bf16) per pipeline stage
    return GpuTiling(q_block=max(1, 64 // gp), decode_tokens=max(1, 16 // gp), kv_chunk=chunk,
                     kv_splits=choose_kv_splits(batch, num_kv_heads, max_context, chunk, num_sms),
                     group=gp, head_dim=dp)


def num_prefill_blocks(num_tokens: int, batch: int, t: GpuTiling, max_query_len: int | None = None) -> int:
    """Static bound on the prefill query blocks of a batch (sum over prefill sequences of cdiv(q_len, TQ)).

    Each prefill sequence has q_len >= TD + 1 tokens, so there are at most min(B, T // (TD + 1)) of
    them and sum cdiv(q_len, TQ) <= T // TQ + #prefills. max_query_len <= TD: a decode-only batch."""
    if max_query_len is not None and max_query_len <= t.decode_tokens:
        return 0
    return -(-num_tokens // t.q_block) + min(batch, num_tokens // (t.decode_tokens + 1))


# ----------------------------------------------------------------------------- kernel body


def _attend(q, q_pos, b, seq_len, lo, c_lo, c_hi, *, layer, h, bt_ref, k_ref, v_ref, ks_ref, vs_ref, block_size,
            head_dim, t: GpuTiling, sm_scale, soft_cap, window, dot_dtype):
    """Online softmax of query rows over KV chunks [c_lo, c_hi) of sequence b. ks_ref / vs_ref: the
    row scales of an int8 / fp8 cache (None for a float one): rows are dequantized in f32 as read.

    q [R, Dp] (unscaled); q_pos [R] i32 (a row's causal limit); positions outside [lo, seq_len) are
    masked. Returns m [R], l [R], acc [R, Dp] in f32 (acc not normalised)."""
    chunk, dp = t.kv_chunk, t.head_dim
    precision = lax.Precision.HIGHEST if dot_dtype == jnp.float32 else None
    max_blocks = bt_ref.shape[1]
    q = (q.astype(jnp.float32) * sm_scale).astype(dot_dtype)
    rows = q.shape[0]
    col = jnp.minimum(lax.broadcasted_iota(jnp.int32, (chunk, dp), 1), head_dim - 1)   # clamped: Dp >= D

    def step(c, state):
        m, l, acc = state                           # [R], [R], [R, Dp]
        pos = c * chunk + lax.broadcasted_iota(jnp.int32, (chunk,), 0)          # [C] KV positions
        live = (pos >= lo) & (pos < seq_len)
        # one table read per chunk, shared by K and V; positions past the sequence read the null block
        page = jnp.where(pos < seq_len, bt_ref[b, jnp.minimum(lax.div(pos, block_size), max_blocks - 1)], 0)
        page2 = jnp.broadcast_to(page[:, None], (chunk, dp))
        off2 = jnp.broadcast_to(lax.rem(pos, block_size)[:, None], (chunk, dp))
        k = k_ref[layer, h, page2, off2, col]                                     # [C, Dp]
        v = v_ref[layer, h, page2, off2, col]
        if ks_ref is not None:                      # one scale per position, shared by its row
            off = lax.rem(pos, block_size)
            k = k.astype(jnp.float32) * ks_ref[layer, h, page, off][:, None]
            v = v.astype(jnp.float32) * vs_ref[layer, h, page, off][:, None]
        k = k.astype(dot_dtype)
        v = jnp.where(live[:, None], v, 0).astype(dot_dtype)   # unread pages may hold NaN; 0 * NaN = NaN
        s = jnp.dot(q, k.T, preferred_element_type=jnp.float32, precision=precision)   # [R, C]
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        k_pos = jnp.broadcast_to(pos[None, :], (rows, chunk))
        mask = (k_pos <= q_pos[:, None]) & live[None, :]
        if window is not None:
            mask = mask & (k_pos > q_pos[:, None] - window)
        s = jnp.where(mask, s, _MASK_VALUE)
        m_new = jnp.maximum(m, s.max(axis=-1))
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[:, None])
        l_new = alpha * l + p.sum(axis=-1)
        pv = jnp.dot(p.astype(dot_dtype), v, preferred_element_type=jnp.float32, precision=precision)
        return m_new, l_new, alpha[:, None] * acc + pv

    init = (jnp.full((rows,), _MASK_VALUE, jnp.float32), jnp.zeros((rows,), jnp.float32),
            jnp.zeros((rows, dp), jnp.float32))
    return lax.fori_loop(c_lo, c_hi, step, init)


def _rows_index(h, row0, rows, dp):
    """Index arrays (head, row, col) of rows [row0, row0 + rows) of head h: each [rows, Dp]."""
    row = row0 + lax.broadcasted_iota(jnp.int32, (rows, dp), 0)
    return h, row, lax.broadcasted_iota(jnp.int32, (rows, dp), 1)


def _kernel(layer_ref, bt_ref, lens_ref, qs_ref, blk_seq_ref, blk_tile_ref, q_ref, qd_ref, k_ref, v_ref,
            *refs, num_blocks, t: GpuTiling, window, **attend_kw):
    # grid (NQB + B * S, KVH)
    # layer_ref [1]; bt_ref [B, W]; lens_ref [B]; qs_ref [B+1]    as in ragged_paged_attention
    # blk_seq_ref / blk_tile_ref [max(NQB, 1)]  prefill block -> (sequence or -1, tile index)
    # q_ref  [KVH, (T + TQ) * Gp, Dp]   prefill queries, row = token * Gp + g
    # qd_ref [KVH, B * TD * Gp, Dp]     decode queries, row = (b * TD + j) * Gp + g (zeros if not a decode)
    # k_ref / v_ref [L, KVH, NB, BS, D] whole cache in HBM
    # ks_ref / vs_ref [L, KVH, NB, BS] f32  (an int8 / fp8 cache only) row scales
    # o_ref  [KVH, (T + TQ) * Gp, Dp]   prefill outputs (decode rows never stored)
    # od_ref [KVH, B * S * RD, Dp]; md_ref / ld_ref [KVH, B * S * RD]   decode partials, RD = TD * Gp
    ks_ref, vs_ref, o_ref, od_ref, md_ref, ld_ref = refs if len(refs) == 6 else (None, None, *refs)
    p, h = pl.program_id(0), pl.program_id(1)
    gp, dp, chunk = t.group, t.head_dim, t.kv_chunk
    num_seqs = bt_ref.shape[0]
    layer = layer_ref[0]
    kw = dict(attend_kw, layer=layer, h=h, bt_ref=bt_ref, k_ref=k_ref, v_ref=v_ref, ks_ref=ks_ref, vs_ref=vs_ref,
              t=t, window=window)

    def seq_info(b):
        q_start = qs_ref[b]
        q_len = qs_ref[b + 1] - q_start
        seq_len = lens_ref[b]
        return q_start, q_len, seq_len, seq_len - q_len     # ctx: position of the first query token

    def prefill(_, carry):
        pc = jnp.minimum(p, max(num_blocks - 1, 0))
        b, tile = jnp.maximum(blk_seq_ref[pc], 0), blk_tile_ref[pc]
        q_start, q_len, seq_len, ctx = seq_info(b)
        rows = t.q_block * gp
        idx = _rows_index(h, (q_start + tile * t.q_block) * gp, rows, dp)
        tok = tile * t.q_block + lax.div(lax.broadcasted_iota(jnp.int32, (rows,), 0), gp)  # token in the sequence
        tile_end = ctx + jnp.minimum((tile + 1) * t.q_block, q_len)                       # exclusive causal limit
        lo = jnp.int32(0) if window is None else jnp.maximum(ctx + tile * t.q_block - window + 1, 0)
        _, l, acc = _attend(q_ref[idx], ctx + tok, b, seq_len, lo, lax.div(lo, chunk),
                            lax.div(tile_end + chunk - 1, chunk), **kw)
        out = (acc / jnp.where(l == 0, 1.0, l)[:, None]).astype(o_ref.dtype)
        valid = jnp.broadcast_to((tok < q_len)[:, None], out.shape)   # a block may overrun into the next sequence
        pl_triton.store(o_ref.at[idx], out, mask=valid)
        return carry

    def decode(_, carry):
        b, s = lax.div(p - num_blocks, t.kv_splits), lax.rem(p - num_blocks, t.kv_splits)
        _, q_len, seq_len, ctx = seq_info(b)
        rows = t.decode_tokens * gp
        q = qd_ref[_rows_index(h, b * rows, rows, dp)]
        q_pos = ctx + lax.div(lax.broadcasted_iota(jnp.int32, (rows,), 0), gp)
        lo = jnp.int32(0) if window is None else jnp.maximum(ctx - window + 1, 0)   # row 0 sees the earliest
        c_lo = lax.div(lo, chunk)
        is_decode = (q_len > 0) & (q_len <= t.decode_tokens)
        c_end = jnp.where(is_decode, lax.div(seq_len + chunk - 1, chunk), c_lo)
        per = lax.div(c_end - c_lo + t.kv_splits - 1, t.kv_splits)                # chunks per segment
        a = jnp.minimum(c_lo + s * per, c_end)
        m, l, acc = _attend(q, q_pos, b, seq_len, lo, a, jnp.minimum(a + per, c_end), **kw)
        row0 = (b * t.kv_splits + s) * rows
        od_ref[_rows_index(h, row0, rows, dp)] = acc
        r = row0 + lax.broadcasted_iota(jnp.int32, (rows,), 0)
        md_ref[h, r] = m
        ld_ref[h, r] = l
        return carry

    # Trip counts 0 or 1 from clamped integer arithmetic, not jnp.where(cond, 1, 0): jax 0.11's Triton
    # lowering types a select of two literals like its predicate (i1), which scf.for rejects on the GPU.
    one_if_pos = lambda x: jnp.minimum(jnp.maximum(x, 0), 1)                      # x > 0 -> 1, else 0
    n_prefill = one_if_pos(num_blocks - p) * one_if_pos(blk_seq_ref[jnp.minimum(p, max(num_blocks - 1, 0))] + 1)
    n_decode = one_if_pos(p - num_blocks + 1) * one_if_pos(num_blocks + num_seqs * t.kv_splits - p)
    lax.fori_loop(0, n_prefill, prefill, 0)     # trip count 0 or 1: a branch Triton and the interpreter both take
    lax.fori_loop(0, n_decode, decode, 0)


# ----------------------------------------------------------------------------- wrapper


def _prefill_blocks(query_start, num_blocks, t: GpuTiling):
    """Block -> (sequence, tile) over the prefill sequences; unused blocks get sequence -1.

    Blocks are numbered sequence by sequence; within a sequence the last tile (longest causal
    prefix) comes first so the longest programs start first."""
    q_len = query_start[1:] - query_start[:-1]                               # [B]
    n = jnp.where(q_len > t.decode_tokens, (q_len + t.q_block - 1) // t.q_block, 0)
    ends = jnp.cumsum(n)                                                     # [B] exclusive block ends
    # searchsorted as one broadcast compare (method="compare_all"): the default binary search is a
    # while loop, and on a GPU every iteration of an XLA while loop waits for the host
    i = jnp.arange(max(num_blocks, 1), dtype=jnp.int32)
    seq = jnp.minimum(jnp.searchsorted(ends, i, side="right", method="compare_all"), q_len.shape[0] - 1).astype(jnp.int32)
    used = i < ends[-1]
    tile = ends[seq] - 1 - i                                                 # reversed within the sequence
    return jnp.where(used, seq, -1).astype(jnp.int32), jnp.where(used, tile, 0).astype(jnp.int32)


def _decode_queries(q4, query_start, t: GpuTiling):
    """q4 [T, KVH, Gp, Dp] -> decode rows [KVH, B * TD * Gp, Dp] (zeros where not a decode token)."""
    num_tokens, kvh = q4.shape[:2]
    q_len = query_start[1:] - query_start[:-1]
    j = jnp.arange(t.decode_tokens, dtype=jnp.int32)
    tok = query_start[:-1, None] + j                                         # [B, TD]
    ok = (j < q_len[:, None]) & (q_len[:, None] <= t.decode_tokens)
    qd = jnp.where(ok[..., None, None, None], q4[jnp.minimum(tok, num_tokens - 1)], 0)   # [B, TD, KVH, Gp, Dp]
    return qd.transpose(2, 0, 1, 3, 4).reshape(kvh, -1, t.head_dim)


def _combine(od, md, ld, batch, t: GpuTiling):
    """Decode partials -> [KVH, B, TD * Gp, Dp] f32: o = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s."""
    kvh = od.shape[0]
    rows = t.decode_tokens * t.group
    od = od.reshape(kvh, batch, t.kv_splits, rows, t.head_dim)
    md = md.reshape(kvh, batch, t.kv_splits, rows)
    ld = ld.reshape(kvh, batch, t.kv_splits, rows)
    w = jnp.exp(md - md.max(axis=2, keepdims=True))                          # empty segments: m = -1e30 -> 0
    l = (w * ld).sum(axis=2)
    return (w[..., None] * od).sum(axis=2) / jnp.where(l == 0, 1.0, l)[..., None]


@functools.partial(jax.jit, static_argnames=("sm_scale", "soft_cap", "window", "t", "interpret", "max_query_len"))
def ragged_paged_attention_gpu(q, k5, v5, block_tables, seq_lens, query_start, layer_arr, *scales, sm_scale,
                               soft_cap, window, t: GpuTiling, interpret: bool, max_query_len=None):
    """q [T, NH, D]; k5/v5 [L, KVH, NB, BS, D]; scales: none, or (k, v) [L, KVH, NB, BS] f32 of an
    int8 / fp8 cache; returns [T, NH, D] in q's dtype (contract of ragged_paged_attention; inputs
    already validated)."""
    num_tokens, nh, d = q.shape
    kvh, bs = k5.shape[1], k5.shape[3]
    batch = block_tables.shape[0]
    g, gp, dp = nh // kvh, t.group, t.head_dim
    num_blocks = num_prefill_blocks(num_tokens, batch, t, max_query_len)
    dot_dtype = jnp.float32 if (interpret or q.dtype == jnp.float32) else q.dtype

    q4 = jnp.pad(q.reshape(num_tokens, kvh, g, d), ((0, 0), (0, 0), (0, gp - g), (0, dp - d)))
    q_rows = jnp.pad(q4, ((0, t.q_block), (0, 0), (0, 0), (0, 0))).transpose(1, 0, 2, 3)
    q_rows = q_rows.reshape(kvh, (num_tokens + t.q_block) * gp, dp)
    qd = _decode_queries(q4, query_start, t)
    blk_seq, blk_tile = _prefill_blocks(query_start, num_blocks, t)
    part_rows = batch * t.kv_splits * t.decode_tokens * gp

    kernel = functools.partial(
        _kernel, num_blocks=num_blocks, t=t, window=window, block_size=bs, head_dim=d, sm_scale=sm_scale,
        soft_cap=soft_cap, dot_dtype=dot_dtype)
    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    params = None if interpret else pl_triton.CompilerParams(num_warps=t.num_warps, num_stages=t.num_stages)
    o_rows, od, md, ld = pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct(q_rows.shape, q.dtype),
                   jax.ShapeDtypeStruct((kvh, part_rows, dp), jnp.float32),
                   jax.ShapeDtypeStruct((kvh, part_rows), jnp.float32),
                   jax.ShapeDtypeStruct((kvh, part_rows), jnp.float32)),
        grid=(num_blocks + batch * t.kv_splits, kvh),
        in_specs=[any_spec] * (10 + len(scales)),
        out_specs=[any_spec] * 4,
        interpret=interpret,
        compiler_params=params,
        name="ragged_paged_attention",
    )(layer_arr, block_tables, seq_lens, query_start, blk_seq, blk_tile, q_rows, qd, k5, v5, *scales)

    # prefill rows: [KVH, (T + TQ) * Gp, Dp] -> [T, KVH, Gp, Dp]
    out_pf = o_rows.reshape(kvh, num_tokens + t.q_block, gp, dp)[:, :num_tokens].transpose(1, 0, 2, 3)
    # decode rows: partials combined, then each decode token picks its sequence's row block
    dec = _combine(od, md, ld, batch, t).reshape(kvh, batch * t.decode_tokens, gp, dp)
    tok = jnp.arange(num_tokens, dtype=jnp.int32)
    seq = token_sequences(query_start, num_tokens)
    j = tok - query_start[seq]
    q_len = query_start[seq + 1] - query_start[seq]
    out_dec = dec[:, seq * t.decode_tokens + jnp.clip(j, 0, t.decode_tokens - 1)].transpose(1, 0, 2, 3)
    is_decode = (q_len <= t.decode_tokens)[:, None, None, None]
    out = jnp.where(is_decode, out_dec.astype(q.dtype), out_pf)[:, :, :g, :d].reshape(num_tokens, nh, d)
    # rows no sequence owns (and prefill rows never stored: uninitialized on GPU) are zeroed
    return jnp.where((tok < query_start[-1])[:, None, None], out, 0).astype(q.dtype)
