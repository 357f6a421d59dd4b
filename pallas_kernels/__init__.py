"""pallas_kernels: Pallas kernels for paged attention, each beside its pure-jnp reference."""
from pallas_kernels.kv_cache_write import kv_cache_write, kv_cache_write_reference
from pallas_kernels.attention_triton import GpuTiling
from pallas_kernels.ragged_paged_attention import (Tiling, ragged_paged_attention,
                                                    ragged_paged_attention_reference)

__all__ = ["GpuTiling", "Tiling", "kv_cache_write", "kv_cache_write_reference", "ragged_paged_attention",
           "ragged_paged_attention_reference"]
