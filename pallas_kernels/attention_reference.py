"""Plain-jnp ragged paged attention (the kernels' reference) and the argument checks they share."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.kv_quant import dequantize_kv, kv_format, validate_scales

_FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def validate_attention_args(q, k_pages, v_pages, block_tables, seq_lens, query_start, layer, sm_scale,
                            soft_cap, sliding_window, k_scales=None, v_scales=None):
    """ValueError naming what is wrong. k_scales/v_scales: an int8 / fp8 cache's scales
    [(L,) KVH, NB, BS] f32 (pallas_kernels.kv_quant); q is then any float dtype."""
    shapes = (f"q {q.shape} {q.dtype}, k_pages {k_pages.shape} {k_pages.dtype}, v_pages "
              f"{v_pages.shape} {v_pages.dtype}, block_tables {block_tables.shape} {block_tables.dtype}, "
              f"seq_lens {seq_lens.shape} {seq_lens.dtype}, query_start {query_start.shape} "
              f"{query_start.dtype}")

    def fail(why):
        raise ValueError(f"ragged_paged_attention: {why} (got {shapes})")

    if q.ndim != 3:
        fail("q must be [T, NH, D]")
    if k_pages.ndim not in (4, 5):
        fail("k_pages must be [KVH, NB, BS, D] or [L, KVH, NB, BS, D]")
    if k_pages.shape != v_pages.shape:
        fail("k_pages and v_pages must have the same shape")
    if (k_pages.ndim == 5) != (layer is not None):
        fail("a 5-D cache needs `layer`, a 4-D cache takes no `layer`")
    if layer is not None and (jnp.shape(layer) != () or not jnp.issubdtype(jnp.result_type(layer), jnp.integer)):
        fail(f"layer must be an integer scalar, got shape {jnp.shape(layer)}")
    if (k_scales is None) != (v_scales is None):
        fail("k_scales and v_scales come together")
    if k_scales is not None:
        if k_pages.dtype != v_pages.dtype or q.dtype not in _FLOAT_DTYPES:
            fail("a quantized cache needs k_pages and v_pages of one dtype and float queries")
        validate_scales("ragged_paged_attention: k_scales", k_pages, k_scales)
        validate_scales("ragged_paged_attention: v_scales", v_pages, v_scales)
    elif kv_format(k_pages.dtype) is not None:
        fail("an int8 / fp8 cache needs k_scales and v_scales")
    elif not (q.dtype == k_pages.dtype == v_pages.dtype) or q.dtype not in _FLOAT_DTYPES:
        fail("q, k_pages and v_pages must share one float dtype (float32, bfloat16, float16)")
    t, nh, d = q.shape
    kvh, _, _, dk = k_pages.shape[-4:]
    if dk != d:
        fail(f"head_dim of q ({d}) and the cache ({dk}) differ")
    if nh % kvh:
        fail(f"query heads ({nh}) must be a multiple of KV heads ({kvh})")
    if block_tables.ndim != 2 or block_tables.dtype != jnp.int32 or 0 in block_tables.shape:
        fail("block_tables must be [B, W] int32 with B, W >= 1")
    b = block_tables.shape[0]
    if seq_lens.shape != (b,) or seq_lens.dtype != jnp.int32:
        fail(f"seq_lens must be [{b}] int32")
    if query_start.shape != (b + 1,) or query_start.dtype != jnp.int32:
        fail(f"query_start must be [{b + 1}] int32")
    if not isinstance(sm_scale, (int, float)):
        fail(f"sm_scale must be a Python float, got {type(sm_scale).__name__}")
    if soft_cap is not None and not soft_cap > 0:
        fail(f"soft_cap must be > 0, got {soft_cap}")
    if sliding_window is not None and (int(sliding_window) != sliding_window or sliding_window < 1):
        fail(f"sliding_window must be a positive int, got {sliding_window}")


def token_sequences(query_start: jax.Array, num_tokens: int) -> jax.Array:
    """Sequence of each flat token [T] i32: b with query_start[b] <= t < query_start[b + 1] (padding
    tokens past query_start[B] get the last sequence). One broadcast compare (method="compare_all"):
    the default binary search is an XLA while loop, and on a GPU every iteration of one waits for the host."""
    tok = jnp.arange(num_tokens, dtype=jnp.int32)
    seq = jnp.searchsorted(query_start[1:], tok, side="right", method="compare_all")
    return jnp.clip(seq, 0, query_start.shape[0] - 2).astype(jnp.int32)


def ragged_paged_attention_reference(q, k_pages, v_pages, block_tables, seq_lens, query_start, *,
                                     sm_scale, soft_cap=None, sliding_window=None, layer=None,
                                     interpret=None, max_query_len=None, token_chunk: int | None = None,
                                     k_scales=None, v_scales=None):
    """Plain-jnp ragged paged attention (same contract as the kernel; `interpret` and `max_query_len`
    are ignored). k_scales/v_scales: the scales of an int8 / fp8 cache (pallas_kernels.kv_quant),
    pages dequantized as they are gathered.

    Each query token gathers its own sequence's pages through the block table and runs a
    masked softmax over them; tokens go through `lax.map` in chunks of `token_chunk`
    (default: as many as keep one chunk's gathered K near 2**24 elements), so memory stays
    at token_chunk * W * BS * KVH * D however large the batch.
    """
    del interpret, max_query_len
    validate_attention_args(q, k_pages, v_pages, block_tables, seq_lens, query_start, layer, sm_scale, soft_cap,
                            sliding_window, k_scales, v_scales)
    if k_pages.ndim == 5:
        pick = lambda a: None if a is None else lax.dynamic_index_in_dim(a, layer, 0, keepdims=False)
        k_pages, v_pages, k_scales, v_scales = map(pick, (k_pages, v_pages, k_scales, v_scales))

    def gather(pages, scales, ids):               # [KVH, NB, BS, D] -> [KVH, W * BS, D] f32
        x = pages[:, ids] if scales is None else dequantize_kv(pages[:, ids], scales[:, ids])
        return x.reshape(kvh, -1, d).astype(jnp.float32)
    t, nh, d = q.shape
    kvh, _, bs, _ = k_pages.shape
    b, w = block_tables.shape
    g = nh // kvh

    tok = jnp.arange(t, dtype=jnp.int32)
    seq = token_sequences(query_start, t)
    valid = tok < query_start[-1]
    q_len = query_start[seq + 1] - query_start[seq]
    pos = seq_lens[seq] - q_len + (tok - query_start[seq])       # absolute position of each query

    def one_token(args):
        qt, sid, p, ok = args                                    # [NH, D], (), (), ()
        pages = block_tables[sid]                                # [W]
        k, v = gather(k_pages, k_scales, pages), gather(v_pages, v_scales, pages)
        kpos = jnp.arange(w * bs)
        seen = (kpos <= p) & (kpos < seq_lens[sid])
        if sliding_window is not None:
            seen = seen & (kpos > p - sliding_window)
        qg = qt.reshape(kvh, g, d).astype(jnp.float32) * sm_scale
        s = jnp.einsum("kgd,ksd->kgs", qg, k, precision=lax.Precision.HIGHEST)
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        s = jnp.where(seen, s, -jnp.inf)
        probs = jax.nn.softmax(s, axis=-1)
        probs = jnp.where(seen & ok, probs, 0.0)                 # padding rows: all zero, not NaN
        v = jnp.where(seen[None, :, None], v, 0.0)               # unread pages may hold NaN
        o = jnp.einsum("kgs,ksd->kgd", probs, v, precision=lax.Precision.HIGHEST)
        return o.reshape(nh, d)

    if token_chunk is None:
        token_chunk = max(1, min(64, 2 ** 24 // (w * bs * kvh * d)))
    out = lax.map(one_token, (q, seq, pos, valid), batch_size=min(token_chunk, t))
    return out.astype(q.dtype)
