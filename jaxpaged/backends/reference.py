"""The jnp backend: the pure-jnp references of pallas_kernels (every other backend is checked
against these)."""
from __future__ import annotations

from jaxpaged.backends.base import Backend


class ReferenceBackend(Backend):
    name = "jnp"

    def _write_fn(self):
        from pallas_kernels import kv_cache_write_reference
        return kv_cache_write_reference

    def _attend_fn(self):
        from pallas_kernels import ragged_paged_attention_reference
        return ragged_paged_attention_reference
