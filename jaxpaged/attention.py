"""The attention call model code makes, and the step metadata it reads.

`attention(q, k, v, kv_cache, layer, meta, opts)` writes this step's K/V into the paged cache and
attends over it, through the kernels of the backend named in `opts` (jaxpaged/backends). Under
tensor parallelism (`opts.mesh`) the backend's kernels run on each device's own heads (shard_map);
the model code does not change.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import jax


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class AttentionMetadata:
    """Where each flat token sits in the paged cache. Built by the runner, shared by all layers."""
    slot_mapping: jax.Array   # [T] int32  block_id * block_size + offset; padding -> null block 0
    block_tables: jax.Array   # [B, W] int32  physical blocks of each sequence
    seq_lens: jax.Array       # [B] int32  context length incl. this step's tokens; 0 for padding
    query_start: jax.Array    # [B+1] int32  cumulative query offsets into the flat batch


# what a profiling run may leave out of the attention (bench latency --breakdown); None: nothing
SKIPS = (None, "read", "all")


@dataclass(frozen=True)
class AttentionOptions:
    """Static (hashable) attention settings for one model/engine."""
    sm_scale: float
    sliding_window: int | None = None
    backend: str = "pallas"   # a kernel backend's name (jaxpaged/backends: native, pallas, jnp)
    mesh: Any = None          # jax.sharding.Mesh ("tp" axis) under tensor parallelism (sharding.py), else None
    skip: str | None = None   # profiling only: "read" = write K/V but attend to nothing, "all" = neither

    def __post_init__(self):
        if self.skip not in SKIPS:
            raise ValueError(f"skip: expected one of {SKIPS}, got {self.skip!r}")

    @property
    def tp_size(self) -> int:
        return 1 if self.mesh is None else self.mesh.size


def attention(q, k, v, kv_cache, layer, meta: AttentionMetadata, opts: AttentionOptions):
    """q [T, NH, D]; k, v [T, KVH, D]; kv_cache = (k_pages, v_pages) in the backend's storage, each
    [L, KVH, NB, BS, D]; layer: int32 scalar. Returns (out [T, NH, D] in q's dtype, new kv_cache)."""
    if opts.mesh is not None:
        from jaxpaged.sharding import shard_attention
        local = dataclasses.replace(opts, mesh=None)
        per_shard = shard_attention(lambda *a: attention(*a, local), opts.mesh)
        return per_shard(q, k, v, kv_cache, layer, meta)
    from jaxpaged.backends import get_backend
    backend = get_backend(opts.backend)
    if opts.skip == "all":
        return q, kv_cache
    kv_cache = backend.write_kv(k, v, kv_cache, layer, meta)
    if opts.skip == "read":
        return q, kv_cache
    return backend.attend(q, kv_cache, layer, meta, opts).astype(q.dtype), kv_cache
