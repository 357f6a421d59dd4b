"""The KV cache's storage arrays, and the quantized form (int8 / fp8 pages + scales).

`EngineConfig.kv_cache_dtype` names what the cache holds (jaxpaged/kv_dtypes.py). The 8-bit ones
are quantized per (token, KV head) at write (pallas_kernels/kv_quant.py): K and V each become a
`QuantizedPages` (8-bit pages [L, KVH, NB, BS, D] + f32 scales [L, KVH, NB, BS]), so one token of
one head costs D + 4 bytes instead of 2D (bf16) or 4D (f32). The kv_cache the model code passes
through stays (k, v): each is an array or a `QuantizedPages`, opaque to the model; block
copies and the KV-head sharding act on every leaf (all of them carry [L, KVH, NB, BS, ...]).
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from jaxpaged.kv_dtypes import is_quantized, kv_bytes_per_block  # noqa: F401 (re-exported for backends)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class QuantizedPages:
    """K or V of an int8 / fp8 cache: row (layer, head, block, offset) = pages[...] * scales[...]."""
    # [L, KVH, NB, BS, D] int8, float8_e4m3fn, or uint8 (e4m3 bits: XLA:CPU scatters them in place)
    pages: jax.Array
    scales: jax.Array     # [L, KVH, NB, BS] f32

    @property
    def dtype(self):
        return self.pages.dtype

    @property
    def shape(self):
        return self.pages.shape


def cache_shapes(shape: tuple[int, ...], storage_dtype, quantized: bool):
    """(k, v) of ShapeDtypeStructs for a cache of pages `shape` [L, KVH, NB, BS, D]."""
    pages = jax.ShapeDtypeStruct(shape, storage_dtype)
    one = QuantizedPages(pages, jax.ShapeDtypeStruct(shape[:-1], jnp.float32)) if quantized else pages
    return one, one


def write_quantized(write, k, v, kv_cache, layer, meta):
    """k, v [T, KVH, D] float -> kv_cache of QuantizedPages with row t quantized (scale per row) and
    written at slot meta.slot_mapping[t] of `layer`: the 8-bit rows by `write` (a kv_cache_write with
    pallas_kernels' contract), their scales by XLA's scatter."""
    from pallas_kernels.kv_quant import quantize_kv, write_scales
    kc, vc = kv_cache
    kq, ks = quantize_kv(k, kc.pages.dtype)                  # [T, KVH, D], [T, KVH]
    vq, vs = quantize_kv(v, vc.pages.dtype)
    k_pages, v_pages = write(kc.pages, vc.pages, kq, vq, meta.slot_mapping, layer=layer)
    k_scales, v_scales = write_scales(kc.scales, vc.scales, ks, vs, meta.slot_mapping, layer=layer)
    return QuantizedPages(k_pages, k_scales), QuantizedPages(v_pages, v_scales)


def attend_args(kv_cache):
    """(k_pages, v_pages, scale kwargs) of a kv_cache for pallas_kernels' attention contract."""
    k, v = kv_cache
    if isinstance(k, QuantizedPages):
        return k.pages, v.pages, {"k_scales": k.scales, "v_scales": v.scales}
    return k, v, {}
