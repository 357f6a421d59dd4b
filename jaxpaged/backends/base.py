"""Backend: what every kernel backend provides (storage choices + the attention kernels).

Storage: the KV cache holds `kv_storage_dtype(name)` arrays [L, KVH, NB, BS, D]; the params go
through `lay_out_params` once at load (backends/layout.py: bf16 bit patterns on XLA:CPU, vocabulary
tables in f32 there, packed weights where a backend has its own matmul). Kernels: `write_kv` puts a
step's new K/V rows into the pages, `attend` runs ragged paged attention over them; both follow
pallas_kernels' contracts.
"""
from __future__ import annotations

import jax.numpy as jnp

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def kv_bytes_per_block(cfg, block_size: int, dtype: str) -> int:
    """Bytes of one KV block over all layers, K and V. dtype: the KV cache's dtype name."""
    itemsize = 2 if dtype == "bfloat16" else 4
    return 2 * cfg.num_layers * cfg.num_kv_heads * block_size * cfg.head_dim * itemsize


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
        """The cache arrays' dtype for a KV dtype name."""
        return _DTYPES[name]

    def packs_weights(self, dtype: str, mesh) -> bool:
        """Whether this backend multiplies by its own packed weights (native CPU matmuls)."""
        return False

    def pack(self, w, *, stacked: bool):
        raise NotImplementedError(f"the {self.name} backend has no packed weights")

    # ---- kernels ------------------------------------------------------------------------------
    def write_kv(self, k, v, kv_cache, layer, meta):
        """k, v [T, KVH, D] -> kv_cache with row t written at slot meta.slot_mapping[t] of `layer`."""
        k_pages, v_pages = kv_cache
        write = self._write_fn()
        return write(k_pages, v_pages, k.astype(k_pages.dtype), v.astype(v_pages.dtype),
                     meta.slot_mapping, layer=layer)

    def attend(self, q, kv_cache, layer, meta, opts):
        """q [T, NH, D] -> [T, NH, D]: each row over its sequence's pages (causal, GQA). The kernels
        take q in the cache's dtype (a wider cache than the model: f32 pages on CPU)."""
        k_pages, v_pages = kv_cache
        attend = self._attend_fn()
        return attend(q.astype(k_pages.dtype), k_pages, v_pages, meta.block_tables, meta.seq_lens,
                      meta.query_start, sm_scale=opts.sm_scale, sliding_window=opts.sliding_window,
                      layer=layer)

    def _write_fn(self):
        raise NotImplementedError

    def _attend_fn(self):
        raise NotImplementedError
