"""Ragged paged attention on Hopper with Mosaic GPU (`plgpu`, jax >= 0.11): the same contract and the
same program split as attention_triton (prefill query blocks + split-KV decode segments), written
as a warp-specialised kernel.

Each CUDA block runs two warpgroups:
- the producer (`_memory_wg`) walks the program's KV chunks (C = 64 positions = 64 / BS pages) and
  TMA-copies every page of a chunk straight from the paged cache into one slot of a ring of
  `stages` SMEM slots (K and V each; one barrier per slot, arrived by each page's copy), waiting
  for the consumer to free a slot before refilling it;
- the consumer (`_compute_wg`) runs 64 query rows against each chunk: QK^T and P.V on the tensor
  cores (wgmma), an online softmax in registers, then frees the slot.
The program's work is described by one row of an int32 table the wrapper builds in XLA
(`_program_table`: sequence, chunk range, first query position, window start, length), so the
kernel reads 6 scalars and never derives the ragged layout itself. Every program writes its
unnormalised (acc, m, l) (acc only for its real query rows); an XLA epilogue normalises the prefill blocks, combines the
decode segments (attention_triton._combine) and gathers the rows back to tokens.

Applies to bf16/f16 caches with head_dim 64 or 128, page sizes dividing 64 (8/16/32/64) and GQA
groups <= 64 (`supports`); other shapes keep the Triton kernel. Pages a chunk must not read (past
the sequence, wholly before the sliding window) are replaced by its first page in the window,
whose rows are finite, and masked: a sequence's own pages must hold finite values (the engine's do).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.attention_reference import token_sequences
from pallas_kernels.attention_triton import GpuTiling, _combine, _decode_queries, _prefill_blocks, num_prefill_blocks

ROWS = 64                  # query rows per program: one wgmma M tile
CHUNK = 64                 # KV positions per ring slot
_MASK_VALUE = -1e30
_LOG2E = math.log2(math.e)


def supports(dtype, head_dim: int, block_size: int, group: int) -> bool:
    return (jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) and head_dim in (64, 128)
            and CHUNK % block_size == 0 and block_size % 8 == 0 and group <= ROWS)


def mosaic_tiling(num_heads: int, num_kv_heads: int, head_dim: int, splits: int, stages: int = 4,
                  compute_wgs: int = 2) -> GpuTiling:
    """stages: SMEM ring slots (K and V chunks in flight); compute_wgs: 1 or 2 consumer warpgroups
    (stages must be a multiple of it: each slot belongs to one consumer). Defaults measured on an
    H200 (BENCHMARKS.md, `bench gpu-check --mosaic-variants`): 4 slots x 2 consumers moved 1.18-1.24x
    the bytes/s of 3 x 1 on batch-64 decodes, and matched the reference there."""
    if compute_wgs not in (1, 2) or stages % compute_wgs or stages < compute_wgs:
        raise ValueError(f"mosaic tiling: compute_wgs {compute_wgs} must be 1 or 2 and divide stages {stages}")
    gp = pl.next_power_of_2(num_heads // num_kv_heads)
    return GpuTiling(q_block=ROWS // gp, decode_tokens=ROWS // gp, kv_chunk=CHUNK, kv_splits=splits,
                     group=gp, head_dim=head_dim, num_warps=4, num_stages=stages, kernel="mosaic",
                     compute_wgs=compute_wgs)


def _program_table(query_start, seq_lens, blk_seq, blk_tile, num_blocks, t: GpuTiling, window):
    """[P, 7] int32 per program: (sequence, first chunk, end chunk, first query position, window
    start, sequence length, rows holding real queries); P = NQB + B * S. Programs with nothing to
    do get an empty chunk range and 0 rows."""
    batch = seq_lens.shape[0]
    q_len = query_start[1:] - query_start[:-1]
    ctx = seq_lens - q_len
    c = t.kv_chunk
    # prefill blocks
    b = jnp.maximum(blk_seq[:num_blocks], 0)
    used = blk_seq[:num_blocks] >= 0
    qpos = ctx[b] + blk_tile[:num_blocks] * t.q_block
    end = ctx[b] + jnp.minimum((blk_tile[:num_blocks] + 1) * t.q_block, q_len[b])
    lo = jnp.zeros_like(qpos) if window is None else jnp.maximum(qpos - window + 1, 0)
    rows_pf = jnp.where(used, jnp.minimum(t.q_block, q_len[b] - blk_tile[:num_blocks] * t.q_block) * t.group, 0)
    pf = [b, lo // c, jnp.where(used, (end + c - 1) // c, lo // c), qpos, lo, seq_lens[b], rows_pf]
    # decode segments: program NQB + b * S + s
    bd = jnp.repeat(jnp.arange(batch, dtype=jnp.int32), t.kv_splits)
    s = jnp.tile(jnp.arange(t.kv_splits, dtype=jnp.int32), batch)
    lo_d = jnp.zeros_like(bd) if window is None else jnp.maximum(ctx[bd] - window + 1, 0)
    c_lo = lo_d // c
    is_dec = (q_len[bd] > 0) & (q_len[bd] <= t.decode_tokens)
    c_end = jnp.where(is_dec, (seq_lens[bd] + c - 1) // c, c_lo)
    per = (c_end - c_lo + t.kv_splits - 1) // t.kv_splits
    a = jnp.minimum(c_lo + s * per, c_end)
    dec = [bd, a, jnp.minimum(a + per, c_end), ctx[bd], lo_d, seq_lens[bd], jnp.where(is_dec, q_len[bd] * t.group, 0)]
    cols = [jnp.concatenate([x.astype(jnp.int32), y.astype(jnp.int32)]) for x, y in zip(pf, dec)]
    return jnp.stack(cols, axis=1)


def _kernel(info_ref, bt_ref, layer_ref, q_ref, k_ref, v_ref, acc_ref, m_ref, l_ref, scoped, *,
            t: GpuTiling, block_size, sm_scale, soft_cap, window):
    # info_ref [P, 7] i32; bt_ref [B, W] i32; layer_ref [1] i32
    # q_ref [KVH, P, 64, D]; k_ref / v_ref [L, KVH, NB, BS, D] (GMEM, read by TMA page by page)
    # acc_ref [KVH, P, 64, D] f32; m_ref / l_ref [KVH, P, 64] f32 (unnormalised partials; acc rows
    #   past the program's real query rows are never written)
    # Warpgroups 0 .. CW-1 compute (CW = t.compute_wgs), warpgroup CW copies. Consumer c takes chunks
    # c, c + CW, ...; chunk i lives in ring slot i % stages, so with stages % CW == 0 every slot has
    # one consumer and each thread's barrier phases advance in order.
    (q_smem, k_smem, v_smem, p_smem, o_smem, m_smem, l_smem), (q_bar, k_bars, v_bars, done_bar), (k_free, v_free) = scoped
    p, h, wg = lax.axis_index("p"), lax.axis_index("h"), lax.axis_index("wg")
    b, c_lo, c_hi = info_ref[p, 0], info_ref[p, 1], info_ref[p, 2]
    qpos0, lo, seq_len, real_rows = info_ref[p, 3], info_ref[p, 4], info_ref[p, 5], info_ref[p, 6]
    n = jnp.maximum(c_hi - c_lo, 0)
    cw, stages, chunk, pages = t.compute_wgs, t.num_stages, t.kv_chunk, t.kv_chunk // block_size
    max_blocks = bt_ref.shape[1]

    def consume(c):
        """Consumer c's online softmax over its chunks: (acc [64, D], m [64] in log2 units, l [64])."""
        plgpu.barrier_wait(q_bar)
        m = plgpu.layout_cast(jnp.full((ROWS,), _MASK_VALUE, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
        l = plgpu.layout_cast(jnp.zeros((ROWS,), jnp.float32), plgpu.Layout.WGMMA.reduce(1))
        acc = plgpu.layout_cast(jnp.zeros((ROWS, t.head_dim), jnp.float32), plgpu.Layout.WGMMA)
        shift = int(math.log2(t.group))
        row = plgpu.broadcasted_iota(jnp.int32, (ROWS, chunk), 0, layout=plgpu.Layout.WGMMA)
        col = plgpu.broadcasted_iota(jnp.int32, (ROWS, chunk), 1, layout=plgpu.Layout.WGMMA)
        q_pos = qpos0 + lax.shift_right_logical(row, shift)          # the Gp rows of a token share it
        p_buf = p_smem.at[c]

        def step(j, carry):
            acc, m, l = carry
            i = c + j * cw                                           # chunk index in [0, n)
            slot = lax.rem(i, stages)
            plgpu.barrier_wait(k_bars.at[slot])

            def qk_scope(r):
                plgpu.wgmma(r, q_smem, k_smem.at[slot].transpose((1, 0)))
                return r[...]
            s = pl.run_scoped(qk_scope, plgpu.ACC((ROWS, chunk), jnp.float32)) * sm_scale
            plgpu.barrier_arrive(k_free.at[slot])
            if soft_cap is not None:
                s = soft_cap * jnp.tanh(s / soft_cap)
            k_pos = (c_lo + i) * chunk + col
            ok = (k_pos <= q_pos) & (k_pos >= lo) & (k_pos < seq_len)
            if window is not None:
                ok = ok & (k_pos > q_pos - window)
            s = jnp.where(ok, s * _LOG2E, _MASK_VALUE)
            m_new = jnp.maximum(m, s.max(axis=1))
            alpha = jnp.exp2(m - m_new)
            probs = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
            l = l * alpha + probs.sum(axis=1)
            plgpu.barrier_wait(v_bars.at[slot])

            p_buf[...] = probs.astype(p_buf.dtype)        # P through SMEM: wgmma's A operand
            plgpu.commit_smem()

            def pv_scope(r):
                plgpu.wgmma(r, p_buf, v_smem.at[slot])
                return r[...]
            pv = pl.run_scoped(pv_scope, plgpu.ACC((ROWS, t.head_dim), jnp.float32))
            plgpu.barrier_arrive(v_free.at[slot])
            return acc * lax.broadcast_in_dim(alpha, acc.shape, [0]) + pv, m_new, l

        mine = lax.div(jnp.maximum(n - c, 0) + cw - 1, cw)          # chunks c, c + cw, ... below n
        return lax.fori_loop(0, mine, step, (acc, m, l))

    def store(acc, m, l):
        o_smem[...] = acc
        m_smem[...] = m * (1.0 / _LOG2E)        # the loop keeps m in log2 units; partials are natural-log
        l_smem[...] = l
        plgpu.commit_smem()
        # only the real rows (a decode token is Gp of 64): TMA boxes are static, so a ladder of
        # power-of-two row counts whose bits add up to real_rows
        start = real_rows & 0                   # traced: a constant start does not lower as a subview offset
        for k in (64, 32, 16, 8, 4, 2, 1):
            rows = pl.ds(start, k)
            pl.when((real_rows & k) != 0)(
                lambda rows=rows: plgpu.copy_smem_to_gmem(o_smem.at[rows], acc_ref.at[h, p, rows]))
            start = start + (real_rows & k)
        plgpu.copy_smem_to_gmem(m_smem, m_ref.at[h, p])
        plgpu.copy_smem_to_gmem(l_smem, l_ref.at[h, p])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 0)
    def _first_consumer():
        plgpu.copy_gmem_to_smem(q_ref.at[h, p], q_smem, q_bar)
        acc, m, l = consume(0)
        if cw == 2:                             # merge the second consumer's partials (through SMEM)
            plgpu.barrier_wait(done_bar)
            acc2 = plgpu.load(o_smem, layout=plgpu.Layout.WGMMA)
            m2 = plgpu.load(m_smem, layout=plgpu.Layout.WGMMA.reduce(1))
            l2 = plgpu.load(l_smem, layout=plgpu.Layout.WGMMA.reduce(1))
            m_all = jnp.maximum(m, m2)
            a1, a2 = jnp.exp2(m - m_all), jnp.exp2(m2 - m_all)
            acc = (acc * lax.broadcast_in_dim(a1, acc.shape, [0]) + acc2 * lax.broadcast_in_dim(a2, acc.shape, [0]))
            m, l = m_all, l * a1 + l2 * a2
        store(acc, m, l)

    if cw == 2:
        @pl.when(wg == 1)
        def _second_consumer():
            acc, m, l = consume(1)
            o_smem[...] = acc                   # m stays in log2 units here: the merge reads it as such
            m_smem[...] = m
            l_smem[...] = l
            plgpu.commit_smem()
            plgpu.barrier_arrive(done_bar)

    @pl.when(wg == cw)
    def _memory_wg():
        layer = layer_ref[0]
        first = bt_ref[b, jnp.minimum(lax.div(lo, block_size), max_blocks - 1)]   # the first page in [lo, seq_len)

        def issue(i, slot):
            """TMA the pages of chunk c_lo + i into ring slot `slot` (K and V)."""
            for j in range(pages):                               # static: 64 / BS page copies
                blk = (c_lo + i) * pages + j
                pos = blk * block_size
                live = (pos < seq_len) & (pos + block_size > lo)
                page = jnp.where(live, bt_ref[b, jnp.minimum(blk, max_blocks - 1)], first)
                rows = pl.ds(j * block_size, block_size)
                plgpu.copy_gmem_to_smem(k_ref.at[layer, h, page], k_smem.at[slot, rows], k_bars.at[slot])
                plgpu.copy_gmem_to_smem(v_ref.at[layer, h, page], v_smem.at[slot, rows], v_bars.at[slot])

        for i in range(stages):                                  # fill the ring
            pl.when(i < n)(functools.partial(issue, i, i))

        @pl.loop(0, jnp.maximum(n - stages, 0))
        def _refill(i):
            slot = lax.rem(i, stages)
            plgpu.barrier_wait(k_free.at[slot])                  # the consumer is done with chunk i
            plgpu.barrier_wait(v_free.at[slot])
            issue(i + stages, slot)

        @pl.loop(jnp.maximum(n - stages, 0), n)
        def _drain(i):                                           # the last chunks' frees: the ring is idle
            plgpu.barrier_wait(k_free.at[lax.rem(i, stages)])
            plgpu.barrier_wait(v_free.at[lax.rem(i, stages)])


def kernel_call(info, block_tables, layer_arr, q_all, k5, v5, *, t: GpuTiling, sm_scale, soft_cap, window, interpret):
    kvh, num_progs = q_all.shape[0], q_all.shape[1]
    bs, d = k5.shape[3], k5.shape[4]
    dtype = k5.dtype
    swizzle = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    kernel = functools.partial(_kernel, t=t, block_size=bs, sm_scale=sm_scale, soft_cap=soft_cap, window=window)
    pages = t.kv_chunk // bs

    def entry(info_ref, bt_ref, layer_ref, q_ref, k_ref, v_ref, acc_ref, m_ref, l_ref):
        pl.run_scoped(
            lambda *scoped: kernel(info_ref, bt_ref, layer_ref, q_ref, k_ref, v_ref, acc_ref, m_ref, l_ref, scoped),
            (plgpu.SMEM((ROWS, d), dtype, transforms=swizzle),
             plgpu.SMEM((t.num_stages, t.kv_chunk, d), dtype, transforms=swizzle),
             plgpu.SMEM((t.num_stages, t.kv_chunk, d), dtype, transforms=swizzle),
             plgpu.SMEM((t.compute_wgs, ROWS, t.kv_chunk), dtype, transforms=swizzle),   # P, per consumer
             plgpu.SMEM((ROWS, d), jnp.float32),
             plgpu.SMEM((ROWS,), jnp.float32),
             plgpu.SMEM((ROWS,), jnp.float32)),
            (plgpu.Barrier(),
             plgpu.Barrier(num_arrivals=pages, num_barriers=t.num_stages),   # one arrival per page copy
             plgpu.Barrier(num_arrivals=pages, num_barriers=t.num_stages),
             plgpu.Barrier()),                                               # second consumer done
            (plgpu.Barrier(num_barriers=t.num_stages), plgpu.Barrier(num_barriers=t.num_stages)),
            collective_axes="wg",
        )

    return plgpu.kernel(
        entry,
        out_type=(jax.ShapeDtypeStruct((kvh, num_progs, ROWS, d), jnp.float32),
                  jax.ShapeDtypeStruct((kvh, num_progs, ROWS), jnp.float32),
                  jax.ShapeDtypeStruct((kvh, num_progs, ROWS), jnp.float32)),
        grid=(num_progs, kvh),
        grid_names=("p", "h"),
        num_threads=t.compute_wgs + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=plgpu.InterpretGPUParams() if interpret else None,   # CPU simulation (threads, barriers, TMA)
    )(info, block_tables, layer_arr, q_all, k5, v5)


@functools.partial(jax.jit, static_argnames=("sm_scale", "soft_cap", "window", "t", "interpret", "max_query_len"))
def ragged_paged_attention_mosaic(q, k5, v5, block_tables, seq_lens, query_start, layer_arr, *, sm_scale,
                                  soft_cap, window, t: GpuTiling, interpret: bool = False, max_query_len=None):
    """q [T, NH, D]; k5/v5 [L, KVH, NB, BS, D] (bf16/f16); returns [T, NH, D] (contract of
    ragged_paged_attention; inputs validated, `supports` checked by the caller)."""
    num_blocks = num_prefill_blocks(q.shape[0], block_tables.shape[0], t, max_query_len)
    info, q_all = kernel_inputs(q, seq_lens, query_start, k5.shape[1], t=t, window=window, num_blocks=num_blocks)
    acc, m, l = kernel_call(info, block_tables, layer_arr, q_all, k5, v5, t=t, sm_scale=sm_scale, soft_cap=soft_cap,
                      window=window, interpret=interpret)
    return _gather_outputs(acc, m, l, query_start, q.shape, num_blocks, t, q.dtype)


def kernel_inputs(q, seq_lens, query_start, num_kv_heads, *, t: GpuTiling, window, num_blocks):
    """(program table [P, 7] i32, queries [KVH, P, 64, D]) of the flat batch; a function of its own
    so that `bench gpu-check` can time the kernel without this XLA prologue."""
    num_tokens, nh, d = q.shape
    kvh, batch = num_kv_heads, seq_lens.shape[0]
    g, gp = nh // kvh, t.group
    q4 = jnp.pad(q.reshape(num_tokens, kvh, g, d), ((0, 0), (0, 0), (0, gp - g), (0, 0)))   # [T, KVH, Gp, D]
    blk_seq, blk_tile = _prefill_blocks(query_start, num_blocks, t)
    q_len = query_start[1:] - query_start[:-1]

    # queries of each program: prefill block rows (token = start + tile * TQ + j), decode rows per segment
    j = jnp.arange(t.q_block, dtype=jnp.int32)
    b = jnp.maximum(blk_seq[:num_blocks], 0)
    tok_in_seq = blk_tile[:num_blocks, None] * t.q_block + j                                # [NQB, TQ]
    ok = (tok_in_seq < q_len[b][:, None]) & (blk_seq[:num_blocks, None] >= 0)
    tok = jnp.minimum(query_start[b][:, None] + tok_in_seq, num_tokens - 1)
    q_pf = jnp.where(ok[..., None, None, None], q4[tok], 0).transpose(2, 0, 1, 3, 4)        # [KVH, NQB, TQ, Gp, D]
    q_pf = q_pf.reshape(kvh, num_blocks, ROWS, d)
    q_dec = _decode_queries(q4, query_start, t).reshape(kvh, batch, 1, ROWS, d)
    q_dec = jnp.broadcast_to(q_dec, (kvh, batch, t.kv_splits, ROWS, d)).reshape(kvh, -1, ROWS, d)
    q_all = jnp.concatenate([q_pf, q_dec], axis=1)                                         # [KVH, P, 64, D]
    return _program_table(query_start, seq_lens, blk_seq, blk_tile, num_blocks, t, window), q_all


def _gather_outputs(acc, m, l, query_start, q_shape, num_blocks, t: GpuTiling, dtype):
    """The kernel's partials -> [T, NH, D]: prefill blocks normalised, decode segments combined."""
    num_tokens, nh, d = q_shape
    kvh, batch, gp = acc.shape[0], query_start.shape[0] - 1, t.group
    g = nh // kvh
    q_len = query_start[1:] - query_start[:-1]
    # prefill: normalise each block; token -> (block, row) inverts _prefill_blocks' numbering
    o_pf = (acc[:, :num_blocks] / jnp.where(l[:, :num_blocks] == 0, 1.0, l[:, :num_blocks])[..., None])
    o_pf = o_pf.reshape(kvh, num_blocks * t.q_block, gp, d)
    tok = jnp.arange(num_tokens, dtype=jnp.int32)
    seq = token_sequences(query_start, num_tokens)
    jt = tok - query_start[seq]
    n_blk = jnp.where(q_len > t.decode_tokens, (q_len + t.q_block - 1) // t.q_block, 0)
    ends = jnp.cumsum(n_blk)
    blk = ends[seq] - 1 - jt // t.q_block                                                 # reversed numbering
    row = jnp.clip(blk, 0, max(num_blocks - 1, 0)) * t.q_block + jt % t.q_block
    out_pf = o_pf[:, row] if num_blocks else jnp.zeros((kvh, num_tokens, gp, d), jnp.float32)
    # decode: combine the segments
    dec = _combine(acc[:, num_blocks:].reshape(kvh, -1, d), m[:, num_blocks:].reshape(kvh, -1),
                   l[:, num_blocks:].reshape(kvh, -1), batch, t).reshape(kvh, batch * t.decode_tokens, gp, d)
    out_dec = dec[:, seq * t.decode_tokens + jnp.clip(jt, 0, t.decode_tokens - 1)]
    is_dec = (q_len[seq] <= t.decode_tokens)[None, :, None, None]
    out = jnp.where(is_dec, out_dec, out_pf)[:, :, :g].transpose(1, 0, 2, 3).reshape(num_tokens, nh, d)
    return jnp.where((tok < query_start[-1])[:, None, None], out, 0).astype(dtype)
