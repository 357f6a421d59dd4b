"""Backend: what every kernel backend provides (storage choices + the attention kernels).

Storage: the KV cache holds `kv_storage_dtype(name)` arrays [L, KVH, NB, BS, D] (an int8 / fp8 cache:
`kv_storage.QuantizedPages`, 8-bit pages + f32 scales per row, `kv_cache_shapes`); the params go
through `lay_out_params` once at load (backends/layout.py: bf16 bit patterns on XLA:CPU, vocabulary
tables in f32 there, packed weights where a backend has its own matmul). Kernels: `write_kv` puts a
step's new K/V rows into the pages, `attend` runs ragged paged attention over them; both follow
pallas_kernels' contracts.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpaged.backends.kv_storage import (QuantizedPages, attend_args, cache_shapes, is_quantized,
                                          kv_bytes_per_block, write_quantized)

__all__ = ["Backend", "kv_bytes_per_block"]

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "int8": jnp.int8}


class Backend:
    name = "base"

    def ready(self) -> None:
        """Builds/loads what the kernels need (first use). Raises when they cannot run here."""

    def prepare(self) -> None:
        """Starts, in the background, what `ready` will need (a build), so it overlaps model loading."""

    # ---- storage ------------------------------------------------------------------------------
    def default_kv_dtype(self, model_dtype: str, platform: str) -> str:
        """kv_cache_dtype "auto": the model's dtype, except float32 on XLA:CPU, which widens a
        16-bit cache around every dynamic slice and scatter (the whole cache per call)."""
        return "float32" if platform == "cpu" else model_dtype

    def kv_storage_dtype(self, name: str):
        """The cache arrays' dtype for a KV dtype name (an 8-bit cache: its pages'). fp8 on XLA:CPU is
        held as uint8 bit patterns (XLA:CPU widens a float8 scatter around the whole cache)."""
        if name == "fp8_e4m3":
            return jnp.uint8 if jax.default_backend() == "cpu" else jnp.float8_e4m3fn
        return _DTYPES[name]

    def kv_cache_shapes(self, shape: tuple[int, ...], name: str):
        """(k, v) ShapeDtypeStructs of the cache: arrays of pages `shape` [L, KVH, NB, BS, D], or
        QuantizedPages (pages + scales [L, KVH, NB, BS] f32) for an int8 / fp8 cache."""
        return cache_shapes(shape, self.kv_storage_dtype(name), is_quantized(name))

    def packs_weights(self, dtype: str, mesh) -> bool:
        """Whether this backend multiplies by its own packed weights (native CPU matmuls)."""
        return False

    def reads_blocks(self, mesh) -> bool:
        """Whether this backend multiplies GGUF blocks with its own kernel (`blocks(w)`)."""
        return False

    def blocks(self, w):
        raise NotImplementedError(f"the {self.name} backend has no GGUF block kernel")

    def pack(self, w, *, stacked: bool):
        raise NotImplementedError(f"the {self.name} backend has no packed weights")

    def int8_kernel(self, mesh) -> bool:
        """Whether stacked int8 weights (quantization.Int8Weight) go to this backend's own int8 matmul
        (`int8_weight(w)`) rather than XLA's dot; a backend that packs weights does it in `pack`."""
        return False

    def int8_weight(self, w):
        raise NotImplementedError(f"the {self.name} backend has no int8 matmul kernel")

    # ---- kernels ------------------------------------------------------------------------------
    def write_kv(self, k, v, kv_cache, layer, meta):
        """k, v [T, KVH, D] -> kv_cache with row t written at slot meta.slot_mapping[t] of `layer`
        (quantized first, a scale per row, for an int8 / fp8 cache)."""
        k_pages, v_pages = kv_cache
        write = self._write_fn()
        if isinstance(k_pages, QuantizedPages):
            return write_quantized(write, k, v, kv_cache, layer, meta)
        return write(k_pages, v_pages, k.astype(k_pages.dtype), v.astype(v_pages.dtype),
                     meta.slot_mapping, layer=layer)

    def attend(self, q, kv_cache, layer, meta, opts):
        """q [T, NH, D] -> [T, NH, D]: each row over its sequence's pages (causal, GQA). The kernels
        take q in the cache's dtype (a wider cache than the model: f32 pages on CPU); over an int8 /
        fp8 cache q keeps its dtype and the kernels dequantize the pages as they read them."""
        k_pages, v_pages, scales = attend_args(kv_cache)
        attend = self._attend_fn()
        if not scales:
            q = q.astype(k_pages.dtype)
        return attend(q, k_pages, v_pages, meta.block_tables, meta.seq_lens,
                      meta.query_start, sm_scale=opts.sm_scale, sliding_window=opts.sliding_window,
                      layer=layer, **scales)

    def lora_matmul(self, y, x, a, b, ranks, slots, layer, rows=None):
        """y [T, N] + each row's LoRA delta (x [T, K] @ A @ B of the row's adapter slot, slots [T], 0:
        none) for `layer` of the slot stacks a [L, S, K, R], b [L, S, R, N]; ranks [S] each slot's
        rank (zero-padded past it). Reference: dense over all slots (jaxpaged/lora/weight.py)."""
        from jaxpaged.lora.weight import lora_matmul_reference
        return lora_matmul_reference(y, x, a, b, ranks, slots, layer, rows)

    def _write_fn(self):
        raise NotImplementedError

    def _attend_fn(self):
        raise NotImplementedError
