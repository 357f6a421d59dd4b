"""Ragged paged attention on XLA:CPU through the native kernel (ragged_paged_attention.cc; 8-bit caches:
ragged_paged_attention_8bit.cc).

Same contract as pallas_kernels.ragged_paged_attention: q [T, NH, D]; k_pages/v_pages
[KVH, NB, BS, D] or [L, KVH, NB, BS, D] with `layer`; block_tables [B, W]; seq_lens [B];
query_start [B+1]. The cache may be f32 or bf16 (read as is, converted per page); q is
computed in f32 and the result comes back in q's dtype. A bf16 cache may also be held as its
uint16 bit patterns (the engine's CPU cache: XLA scatters uint16 rows in place); q is then bf16.
An 8-bit cache (pallas_kernels/kv_quant.py) is int8, or fp8 e4m3 as float8_e4m3fn or its uint8 bit
patterns, with k_scales/v_scales [(L,) KVH, NB, BS] f32; q is then any float dtype.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from cpu_kernels.build import load
from pallas_kernels.ragged_paged_attention import _validate

TARGET = "jaxpaged_ragged_paged_attention"            # f32 / bf16 caches (the core kernel library)
TARGET_8BIT = "jaxpaged_ragged_paged_attention_8bit"  # int8 / e4m3 caches (the quant library, built on first use)


@functools.partial(jax.jit, static_argnames=("sm_scale", "soft_cap", "sliding_window", "interpret"))
def ragged_paged_attention_cpu(q, k_pages, v_pages, block_tables, seq_lens, query_start, *, sm_scale,
                               soft_cap=None, sliding_window=None, layer=None, interpret=None,
                               k_scales=None, v_scales=None):
    """Causal attention of a flat ragged batch over a paged KV cache (CPU only; `interpret` is
    ignored). Returns [T, NH, D] in q's dtype; rows at/after query_start[B] are 0."""
    del interpret
    if k_pages.dtype == jnp.float8_e4m3fn:       # the kernel reads e4m3 as its bit patterns
        k_pages, v_pages = (jax.lax.bitcast_convert_type(a, jnp.uint8) for a in (k_pages, v_pages))
    eight_bit = k_pages.dtype in (jnp.int8, jnp.uint8)
    if k_scales is not None or eight_bit:
        _validate(q, k_pages, v_pages, block_tables, seq_lens, query_start, layer, sm_scale, soft_cap,
                  sliding_window, k_scales, v_scales)
    elif k_pages.dtype == jnp.uint16:            # bf16 bit patterns: check shapes as bf16
        as_bf16 = lambda a: jax.ShapeDtypeStruct(a.shape, jnp.bfloat16)
        _validate(q, as_bf16(k_pages), as_bf16(v_pages), block_tables, seq_lens, query_start, layer,
                  sm_scale, soft_cap, sliding_window)
    else:
        _validate(q, k_pages, v_pages, block_tables, seq_lens, query_start, layer, sm_scale, soft_cap,
                  sliding_window)
    if k_pages.dtype not in (jnp.float32, jnp.bfloat16, jnp.uint16, jnp.int8, jnp.uint8):
        raise ValueError(f"ragged_paged_attention_cpu: the cache must be float32 or bfloat16 (or "
                         f"bfloat16 held as uint16), or int8 / fp8 e4m3 with scales, got {k_pages.dtype}")
    load("quant" if eight_bit else "core")       # registers the FFI target (compiles on first use)
    if k_pages.ndim == 4:                        # one layer: view it as a 1-layer stack (free reshape)
        k_pages, v_pages, layer = k_pages[None], v_pages[None], 0
        if k_scales is not None:
            k_scales, v_scales = k_scales[None], v_scales[None]
    if k_scales is None:                         # a float cache: the scale operands are not read
        k_scales = v_scales = jnp.zeros((1,), jnp.float32)
    call = jax.ffi.ffi_call(TARGET_8BIT if eight_bit else TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32))
    out = call(q.astype(jnp.float32), k_pages, v_pages, block_tables, seq_lens, query_start,
               jnp.asarray(layer, jnp.int32).reshape(1), k_scales, v_scales,
               sm_scale=np.float32(sm_scale),
               soft_cap=np.float32(0.0 if soft_cap is None else soft_cap),
               window=np.int32(0 if sliding_window is None else sliding_window))
    return out.astype(q.dtype)
