"""Ragged paged attention: one Pallas call over a flat batch of prefill chunks and decode tokens.

Flow. The wrapper regroups the flat queries `q [T, NH, D]` by KV head into rows
`q_rows [KVH, (T + TQ) * Gp, D]` (row = token * Gp + g, the GQA group zero-padded to
Gp, plus TQ zero tokens at the end so a query tile never reads past the array).
The grid is (sequence, KV-head block, query split). A program walks its sequence's
query tiles: one small tile when q_len <= q_tile_small (decodes), else tiles of TQ
tokens, tile i on split i % q_splits (GPU parallelism for long prefill chunks).
For each tile it loops over KV chunks (whole pages, read through the block table
straight from the cache in HBM) from the first chunk inside the sliding window up
to the tile's causal limit, with an online softmax in f32. Tile rows past the
sequence's last query are never stored (masked store), so no program writes
another sequence's rows. The wrapper then drops the group padding and zeroes the
rows at/after query_start[B], which nobody owns.

This module's kernel is the CPU (interpret-mode) one: all KV heads per program
(batched dots), K/V pages read as dynamic slices, tile rows as index arrays (a
scatter, not a whole-output copy), so the discharged loops run at or below the jnp
reference's time. On a GPU the public function runs attention_triton's split-KV /
query-block kernel instead (attention_mosaic's on jax >= 0.11, when it applies);
that kernel also runs in interpret mode, which is how the tests check it on CPU.
On CPU use an f32 cache: XLA:CPU runs a bf16/f16 dynamic slice in f32 and hoists the
convert out of the loops, so a 16-bit cache is converted whole on every call (same
for the jnp reference; measured, not worked around: a uint16 bitcast is a copy too).

Cache layout (one for both targets): `[KVH, NB, BS, D]` per layer, or
`[L, KVH, NB, BS, D]` with a traced `layer` index picked inside the kernel.
"""
from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from pallas_kernels.attention_reference import ragged_paged_attention_reference  # noqa: F401 (re-export)
from pallas_kernels.attention_reference import validate_attention_args as _validate
from pallas_kernels.kv_quant import dequantize_kv
from pallas_kernels.attention_triton import (DEFAULT_NUM_SMS, GpuTiling, choose_kv_splits, gpu_tiling,
                                             ragged_paged_attention_gpu)

_MASK_VALUE = -1e30        # finite "minus infinity": keeps exp(m_old - m_new) NaN-free


@dataclasses.dataclass(frozen=True)
class Tiling:
    """Static tile sizes of one kernel instance (hashable: part of the jit cache key)."""
    q_tile: int          # TQ: query tokens per tile; rows per tile = TQ * group
    q_tile_small: int    # tile for sequences with q_len <= q_tile_small (decodes): one such tile
    kv_pages: int        # pages per KV chunk; chunk = kv_pages * block_size positions
    heads: int           # KV heads handled by one program (1 on GPU)
    group: int           # Gp: GQA group size padded (>= G)
    q_splits: int        # programs sharing one (sequence, head block): tile i goes to split i % q_splits


def default_tiling(num_heads: int, num_kv_heads: int, block_size: int) -> Tiling:
    """The interpret-mode tiling: few, fat loop iterations (the interpreter pays per op, not per flop)."""
    return Tiling(q_tile=64, q_tile_small=2, kv_pages=max(1, 64 // block_size),
                  heads=num_kv_heads, group=num_heads // num_kv_heads, q_splits=1)


# ----------------------------------------------------------------------------- kernel body


def _dot_qk(q, k, precision):
    """q [(H,) R, D] x k [(H,) C, D] -> scores [(H,) R, C] in f32."""
    if q.ndim == 2:
        return jnp.dot(q, k.T, preferred_element_type=jnp.float32, precision=precision)
    return jnp.einsum("hrd,hcd->hrc", q, k, preferred_element_type=jnp.float32, precision=precision)


def _dot_pv(p, v, precision):
    """p [(H,) R, C] x v [(H,) C, D] -> [(H,) R, D] in f32."""
    if p.ndim == 2:
        return jnp.dot(p, v, preferred_element_type=jnp.float32, precision=precision)
    return jnp.einsum("hrc,hcd->hrd", p, v, preferred_element_type=jnp.float32, precision=precision)


def _ragged_paged_attention_kernel(
    layer_ref, bt_ref, lens_ref, qs_ref, q_ref, k_ref, v_ref, *refs,
    sm_scale, soft_cap, window, tiling: Tiling, block_size, dot_dtype,
):
    # grid (B, KVH // heads, q_splits)
    # layer_ref [1] i32          layer of the cache to read (0 for a per-layer cache)
    # bt_ref    [B, W] i32       block table; entries past a sequence's last page are never trusted
    # lens_ref  [B] i32          context length incl. the new queries (0: padding sequence)
    # qs_ref    [B+1] i32        sequence b's query tokens are [qs[b], qs[b+1])
    # q_ref     [KVH, R, D]      R = (T + TQ) * Gp; row = token * Gp + g
    # k_ref / v_ref [L, KVH, NB, BS, D]  whole cache, left in HBM (pl.ANY)
    # ks_ref / vs_ref [L, KVH, NB, BS] f32  (an int8 / fp8 cache only) each row's scale
    # o_ref     [KVH, R, D]      same row layout as q_ref; only this sequence's rows are stored
    ks_ref, vs_ref, o_ref = refs if len(refs) == 3 else (None, None, *refs)
    gp, bs = tiling.group, block_size
    chunk = tiling.kv_pages * bs                   # KV positions in one chunk
    max_blocks = bt_ref.shape[1]
    d = q_ref.shape[-1]
    precision = lax.Precision.HIGHEST if dot_dtype == jnp.float32 else None

    b, hb, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    # One head -> scalar index (2-D tiles, what Triton wants); several -> a slice (3-D tiles).
    heads = hb if tiling.heads == 1 else pl.ds(hb * tiling.heads, tiling.heads)
    layer = layer_ref[0]
    q_start = qs_ref[b]
    q_len = qs_ref[b + 1] - q_start
    seq_len = lens_ref[b]
    ctx = seq_len - q_len                          # position of the sequence's first query token

    def load_chunk(ref, scale_ref, c):
        """K or V positions [c * chunk, (c + 1) * chunk) of this sequence: [H, chunk, D] (f32,
        dequantized, for an int8 / fp8 cache)."""
        parts = []
        for p in range(tiling.kv_pages):           # static unroll: one dynamic slice per page
            blk = c * tiling.kv_pages + p
            page = jnp.where(blk * bs < seq_len, bt_ref[b, jnp.minimum(blk, max_blocks - 1)], 0)
            x = ref[layer, heads, page, :, :]
            if scale_ref is not None:              # row scales [(H,) BS]
                x = dequantize_kv(x, scale_ref[layer, heads, page, :])
            parts.append(x)
        return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-2)

    def tile_index(row0, rows):
        """Index arrays of rows [row0, row0 + rows) of this program's heads: each [(H,) rows, D]."""
        shape = (rows, d) if tiling.heads == 1 else (tiling.heads, rows, d)
        row = row0 + lax.broadcasted_iota(jnp.int32, shape, len(shape) - 2)
        col = lax.broadcasted_iota(jnp.int32, shape, len(shape) - 1)
        head = hb if tiling.heads == 1 else hb * tiling.heads + lax.broadcasted_iota(jnp.int32, shape, 0)
        return head, row, col

    def attend_tile(i, tq):
        """Query tokens [i * tq, (i + 1) * tq) of the sequence (rows past q_len are not stored)."""
        rows = tq * gp                             # query rows in the tile
        row0 = (q_start + i * tq) * gp             # first row of the tile in q_ref / o_ref
        # Tile rows are addressed with index arrays, not pl.ds: the interpreter discharges a
        # sliced store by padding and copying the whole output, an indexed one is a scatter.
        tile_idx = tile_index(row0, rows)
        q = q_ref[tile_idx]                        # [(H,) rows, D]
        q = (q.astype(jnp.float32) * sm_scale).astype(dot_dtype)
        # query position of each row (the Gp rows of one token share it), broadcast over the chunk
        q_pos = ctx + i * tq + lax.div(lax.broadcasted_iota(jnp.int32, (rows, chunk), 0), gp)
        tile_end = ctx + jnp.minimum((i + 1) * tq, q_len)    # exclusive causal limit of the tile
        lo = jnp.int32(0)
        if window is not None:                     # first position any row of the tile can see
            lo = jnp.maximum(ctx + i * tq - window + 1, 0)
        c_lo, c_hi = lax.div(lo, chunk), lax.div(tile_end + chunk - 1, chunk)   # all >= 0

        def kv_chunk(c, state):
            m, l, acc = state                      # running max [(H,) rows], sum [(H,) rows], out [(H,) rows, D]
            k = load_chunk(k_ref, ks_ref, c).astype(dot_dtype)
            v = load_chunk(v_ref, vs_ref, c)
            # zero V outside [lo, seq_len): those pages may hold anything (NaN included), and 0 * NaN = NaN
            v_pos = c * chunk + lax.broadcasted_iota(jnp.int32, (chunk, d), 0)
            v = jnp.where((v_pos < seq_len) & (v_pos >= lo), v, 0).astype(dot_dtype)
            s = _dot_qk(q, k, precision)           # [(H,) rows, chunk] f32
            if soft_cap is not None:
                s = soft_cap * jnp.tanh(s / soft_cap)
            k_pos = c * chunk + lax.broadcasted_iota(jnp.int32, (rows, chunk), 1)
            mask = k_pos <= q_pos
            if window is not None:
                mask = mask & (k_pos > q_pos - window)
            s = jnp.where(mask, s, _MASK_VALUE)
            m_new = jnp.maximum(m, s.max(axis=-1))
            alpha = jnp.exp(m - m_new)
            p = jnp.exp(s - m_new[..., None])
            l_new = alpha * l + p.sum(axis=-1)
            acc_new = alpha[..., None] * acc + _dot_pv(p.astype(dot_dtype), v, precision)
            return m_new, l_new, acc_new

        lead = q.shape[:-1]                        # [(H,) rows]
        init = (jnp.full(lead, _MASK_VALUE, jnp.float32), jnp.zeros(lead, jnp.float32),
                jnp.zeros(q.shape, jnp.float32))
        _, l, acc = lax.fori_loop(c_lo, c_hi, kv_chunk, init)
        out = (acc / jnp.where(l == 0, 1.0, l)[..., None]).astype(o_ref.dtype)
        # store only rows of this sequence's queries (a tile may overrun into the next sequence)
        valid = (i * tq + lax.div(lax.broadcasted_iota(jnp.int32, out.shape, out.ndim - 2), gp)) < q_len
        pl_triton.store(o_ref.at[tile_idx], out, mask=valid)

    # Two tile sizes, no branching: a sequence with q_len <= q_tile_small (decode, short chunk)
    # runs one small tile on split 0; longer ones run big tiles, tile i on split i % q_splits.
    small = q_len <= tiling.q_tile_small
    n_small = jnp.where(small & (q_len > 0) & (split == 0), 1, 0)
    n_big = jnp.where(small, 0, lax.div(q_len + tiling.q_tile - 1, tiling.q_tile))
    my_big = lax.div(jnp.maximum(n_big - split, 0) + tiling.q_splits - 1, tiling.q_splits)
    lax.fori_loop(0, n_small, lambda i, c: (attend_tile(i, tiling.q_tile_small), c)[1], 0)
    lax.fori_loop(0, my_big, lambda t, c: (attend_tile(split + t * tiling.q_splits, tiling.q_tile), c)[1], 0)


# ----------------------------------------------------------------------------- pallas_call wrapper


def gpu_kernel_choice(choice: str | None = None) -> str:
    """"mosaic" on jax >= 0.11 (Pallas' Triton backend is deprecated there), "triton" before;
    `choice` or else JAXPAGED_GPU_ATTENTION=triton|mosaic overrides it."""
    choice = choice or os.environ.get("JAXPAGED_GPU_ATTENTION", "auto")
    if choice not in ("auto", "triton", "mosaic"):
        raise ValueError(f"gpu_kernel / JAXPAGED_GPU_ATTENTION must be auto, triton or mosaic, got {choice!r}")
    if choice == "auto":
        return "mosaic" if jax.__version_info__ >= (0, 11) else "triton"
    if choice == "mosaic" and jax.__version_info__ < (0, 11):
        raise ValueError("the Mosaic GPU attention kernel needs jax >= 0.11")
    return choice


def default_gpu_tiling(dtype, num_heads, num_kv_heads, head_dim, block_size, batch, max_context,
                       kernel: str | None = None) -> GpuTiling:
    """The GPU kernel's tiling: Mosaic GPU where gpu_kernel_choice() says so and it takes the shape
    (bf16/f16, head_dim 64/128, pages dividing 64), else Triton."""
    gt = gpu_tiling(num_heads, num_kv_heads, head_dim, batch, max_context, _num_sms())
    if gpu_kernel_choice(kernel) == "mosaic":
        from pallas_kernels import attention_mosaic
        if attention_mosaic.supports(dtype, head_dim, block_size, gt.group):
            splits = choose_kv_splits(batch, num_kv_heads, max_context, attention_mosaic.CHUNK, _num_sms(),
                                      programs_per_sm=1)
            return attention_mosaic.mosaic_tiling(num_heads, num_kv_heads, head_dim, splits)
    return gt


def _num_sms() -> int:
    """Streaming multiprocessors of the target GPU (the split count targets them): an abstract
    device's (jax >= 0.11 ahead-of-time lowering), else the first GPU's, else an H100's."""
    abstract = getattr(jax.sharding, "get_abstract_mesh", lambda: None)()
    device = getattr(abstract, "abstract_device", None)
    if device is not None and getattr(device, "num_cores", None):
        return int(device.num_cores)
    try:
        return int(getattr(jax.devices("gpu")[0], "core_count", None) or DEFAULT_NUM_SMS)
    except RuntimeError:
        return DEFAULT_NUM_SMS


def _ragged_paged_attention_call(q_rows, k5, v5, block_tables, seq_lens, query_start, layer_arr, scales, *,
                                 sm_scale, soft_cap, window, tiling: Tiling, interpret: bool):
    """q_rows [KVH, R, D]; k5/v5 [L, KVH, NB, BS, D]; scales: () or (k, v) [L, KVH, NB, BS] of an
    int8 / fp8 cache; returns o_rows [KVH, R, D]."""
    num_kv_heads, block_size = k5.shape[1], k5.shape[3]
    dot_dtype = jnp.float32 if (interpret or q_rows.dtype == jnp.float32) else q_rows.dtype
    kernel = functools.partial(
        _ragged_paged_attention_kernel, sm_scale=sm_scale, soft_cap=soft_cap, window=window,
        tiling=tiling, block_size=block_size, dot_dtype=dot_dtype)
    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(q_rows.shape, q_rows.dtype),
        grid=(block_tables.shape[0], num_kv_heads // tiling.heads, tiling.q_splits),
        in_specs=[any_spec] * (7 + len(scales)),
        out_specs=any_spec,
        interpret=interpret,
        name="ragged_paged_attention",
    )(layer_arr, block_tables, seq_lens, query_start, q_rows, k5, v5, *scales)


# ----------------------------------------------------------------------------- public function


@functools.partial(jax.jit, static_argnames=("sm_scale", "soft_cap", "sliding_window", "interpret", "tiling",
                                             "max_query_len", "gpu_kernel"))
def ragged_paged_attention(q, k_pages, v_pages, block_tables, seq_lens, query_start, *, sm_scale,
                           soft_cap=None, sliding_window=None, layer=None, interpret=None,
                           tiling: Tiling | GpuTiling | None = None, max_query_len: int | None = None,
                           gpu_kernel: str | None = None, k_scales=None, v_scales=None):
    """Causal attention of a flat ragged batch over a paged KV cache. Returns [T, NH, D] (q's dtype).

    q [T, NH, D]; k_pages/v_pages [KVH, NB, BS, D] or [L, KVH, NB, BS, D] with `layer` (int32
    scalar, may be traced); block_tables [B, W] int32; seq_lens [B] int32 (incl. new tokens);
    query_start [B+1] int32. Query i of sequence b sits at position
    seq_lens[b] - q_len_b + (i - query_start[b]). Rows at/after query_start[B] come back as 0.
    Sequences may come in any order (decodes and prefill chunks mixed).
    interpret=None: interpret mode when the default backend is CPU, the GPU kernel otherwise.
    `tiling` overrides the default tile sizes (benchmarks, tests): a `Tiling` runs the CPU kernel
    (interpret mode), a `GpuTiling` the GPU one (attention_triton; in interpret mode too).
    max_query_len (static, optional): an upper bound on any sequence's q_len this call; a bound
    <= the decode tile (e.g. 1 for a decode-only step) launches no prefill programs on GPU.
    gpu_kernel (static): "triton" or "mosaic" (jax >= 0.11; bf16/f16, head_dim 64/128, pages
    dividing 64, else Triton); None: gpu_kernel_choice() (JAXPAGED_GPU_ATTENTION, read at trace time).
    k_scales/v_scales [(L,) KVH, NB, BS] f32: an int8 / fp8 cache's row scales (pallas_kernels.kv_quant);
    pages are dequantized as they are read (on GPU by the Triton kernel on every jax line).
    """
    _validate(q, k_pages, v_pages, block_tables, seq_lens, query_start, layer, sm_scale, soft_cap,
              sliding_window, k_scales, v_scales)
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    t, nh, d = q.shape
    if k_pages.ndim == 4:                         # one layer: view it as a 1-layer stack (free reshape)
        k_pages, v_pages, layer = k_pages[None], v_pages[None], 0
        if k_scales is not None:
            k_scales, v_scales = k_scales[None], v_scales[None]
    scales = () if k_scales is None else (k_scales, v_scales)
    kvh, bs = k_pages.shape[1], k_pages.shape[3]
    g = nh // kvh
    layer_arr = jnp.asarray(layer, jnp.int32).reshape(1)
    window = None if sliding_window is None else int(sliding_window)
    soft_cap = None if soft_cap is None else float(soft_cap)
    if isinstance(tiling, GpuTiling) or (tiling is None and not interpret):
        gt = tiling or default_gpu_tiling(k_pages.dtype, nh, kvh, d, bs, block_tables.shape[0],
                                          block_tables.shape[1] * bs, gpu_kernel)
        if any(x & (x - 1) for x in (gt.group, gt.head_dim, gt.kv_chunk)) or gt.group < g or gt.head_dim < d:
            raise ValueError(f"tiling {gt} does not fit groups of {g} and head_dim {d}")
        kw = dict(sm_scale=float(sm_scale), soft_cap=soft_cap, window=window, t=gt, interpret=interpret,
                  max_query_len=max_query_len)
        if gt.kernel == "mosaic":
            from pallas_kernels import attention_mosaic
            if not attention_mosaic.supports(k_pages.dtype, d, bs, gt.group) or gt.head_dim != d or scales:
                raise ValueError(f"the Mosaic GPU kernel does not take {k_pages.dtype} head_dim {d} block_size {bs}")
            return attention_mosaic.ragged_paged_attention_mosaic(
                q, k_pages, v_pages, block_tables, seq_lens, query_start, layer_arr, **kw)
        return ragged_paged_attention_gpu(q, k_pages, v_pages, block_tables, seq_lens, query_start, layer_arr,
                                          *scales, **kw)
    if not interpret:
        raise ValueError("a CPU `Tiling` runs in interpret mode only (pass a GpuTiling for the GPU kernel)")
    tiling = tiling or default_tiling(nh, kvh, bs)
    if kvh % tiling.heads or tiling.group < g or tiling.q_tile_small > tiling.q_tile:
        raise ValueError(f"tiling {tiling} does not fit {kvh} KV heads with groups of {g}")

    # [T, NH, D] -> [KVH, (T + TQ) * Gp, D]: row = token * Gp + g; padding group heads and the
    # TQ tail tokens are zeros (a tile starting at the last token still reads in bounds).
    q_rows = q.reshape(t, kvh, g, d).transpose(1, 0, 2, 3)
    q_rows = jnp.pad(q_rows, ((0, 0), (0, tiling.q_tile), (0, tiling.group - g), (0, 0)))
    q_rows = q_rows.reshape(kvh, (t + tiling.q_tile) * tiling.group, d)
    o_rows = _ragged_paged_attention_call(
        q_rows, k_pages, v_pages, block_tables, seq_lens, query_start, layer_arr, scales,
        sm_scale=float(sm_scale), soft_cap=soft_cap, window=window, tiling=tiling, interpret=interpret)

    out = o_rows.reshape(kvh, t + tiling.q_tile, tiling.group, d)[:, :t, :g]
    out = out.transpose(1, 0, 2, 3).reshape(t, nh, d)
    # rows no sequence owns were never stored (uninitialized memory on GPU): zero them
    return jnp.where((jnp.arange(t) < query_start[-1])[:, None, None], out, 0).astype(q.dtype)
