"""A quantized paged KV cache: 8-bit K/V rows with one f32 scale per (token, KV head).

Storage (every kernel reads the same):
  pages  [L, KVH, NB, BS, D]  int8, or float8_e4m3fn (fp8 "e4m3"), or uint8 holding e4m3 bit patterns
  scales [L, KVH, NB, BS]     f32: row (layer, head, slot) of the cache is pages[...] * scales[...]

Quantization happens at write (`quantize_kv`): each new row's scale is max|x| / QMAX over the head
dim (QMAX = 127 for int8, 448 for e4m3, the largest finite value), so the row's largest element is
exact; an all-zero row gets scale 0. The kernels dequantize as they read a page (in f32), so the
attention math is the unquantized one on the dequantized rows.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

QMAX = {"int8": 127.0, "fp8_e4m3": 448.0}
STORAGE = {"int8": jnp.int8, "fp8_e4m3": jnp.float8_e4m3fn}
# a cache's element dtype -> its format (uint8: e4m3 bit patterns, the native CPU kernel's form)
FORMATS = {jnp.dtype(jnp.int8): "int8", jnp.dtype(jnp.float8_e4m3fn): "fp8_e4m3",
           jnp.dtype(jnp.uint8): "fp8_e4m3"}


def kv_format(dtype) -> str | None:
    """The quantized format of a cache element dtype, or None for a float cache."""
    return FORMATS.get(jnp.dtype(dtype))


def quantize_kv(x, storage_dtype):
    """x [..., D] float -> (q [..., D] in storage_dtype, scale [...] f32) with x ~= q * scale.

    storage_dtype: int8, float8_e4m3fn, or uint8 (e4m3 bit patterns)."""
    fmt = kv_format(storage_dtype)
    if fmt is None:
        raise ValueError(f"quantize_kv: {jnp.dtype(storage_dtype)} is not a quantized KV dtype")
    x = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x), axis=-1)                                  # [...]
    scale = amax / QMAX[fmt]
    inv = jnp.where(amax > 0, QMAX[fmt] / jnp.where(amax > 0, amax, 1.0), 0.0)
    y = x * inv[..., None]
    if fmt == "int8":
        return jnp.clip(jnp.round(y), -127, 127).astype(jnp.int8), scale
    q = jnp.clip(y, -QMAX[fmt], QMAX[fmt]).astype(jnp.float8_e4m3fn)
    if jnp.dtype(storage_dtype) == jnp.uint8:
        q = jax.lax.bitcast_convert_type(q, jnp.uint8)
    return q, scale


def dequantize_kv(q, scale, dtype=jnp.float32):
    """(q [..., D], scale [...]) -> [..., D] in dtype."""
    if q.dtype == jnp.uint8:
        q = jax.lax.bitcast_convert_type(q, jnp.float8_e4m3fn)
    return (q.astype(jnp.float32) * scale[..., None].astype(jnp.float32)).astype(dtype)


def write_scales(k_scales, v_scales, k_new, v_new, slot_mapping, *, layer=None):
    """Scatters this step's scales k_new/v_new [T, KVH] at slot_mapping [T] into the scale arrays
    [KVH, NB, BS] or [L, KVH, NB, BS] (with `layer`): XLA's row scatter (in place when donated)."""
    bs = k_scales.shape[-1]
    blk, off = slot_mapping // bs, slot_mapping % bs
    if k_scales.ndim == 3:                   # adjacent advanced indices: the view is [KVH, T]
        return (k_scales.at[:, blk, off].set(k_new.swapaxes(0, 1)),
                v_scales.at[:, blk, off].set(v_new.swapaxes(0, 1)))
    return k_scales.at[layer, :, blk, off].set(k_new), v_scales.at[layer, :, blk, off].set(v_new)


def validate_scales(name, pages, scales):
    """ValueError unless `scales` fits `pages` ([..., NB, BS, D] -> [..., NB, BS] f32)."""
    if kv_format(pages.dtype) is None:
        raise ValueError(f"{name}: scales come with an int8 / fp8 cache, got pages of {pages.dtype}")
    if tuple(scales.shape) != tuple(pages.shape[:-1]) or scales.dtype != jnp.float32:
        raise ValueError(f"{name}: scales must be {tuple(pages.shape[:-1])} float32 for pages "
                         f"{tuple(pages.shape)}, got {tuple(scales.shape)} {scales.dtype}")
