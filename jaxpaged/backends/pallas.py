"""The Pallas backend: pallas_kernels' cache write and ragged paged attention (compiled for GPU/TPU,
interpret mode on CPU)."""
from __future__ import annotations

from jaxpaged.backends.base import Backend


class PallasBackend(Backend):
    name = "pallas"

    def _write_fn(self):
        from pallas_kernels import kv_cache_write
        return kv_cache_write

    def _attend_fn(self):
        from pallas_kernels import ragged_paged_attention
        return ragged_paged_attention
