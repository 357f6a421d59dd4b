"""How big the paged KV pool is, and the longest sequence (max_model_len) the engine serves.

The pool, in blocks of `block_size` tokens (+ the reserved null block 0), is sized by the first of:

1. `num_kv_blocks`            exactly that many blocks;
2. `kv_cache_memory_bytes`    that many bytes of K and V (vLLM's --kv-cache-memory-bytes);
3. `gpu_memory_utilization`   that fraction of the device's memory (on CPU: of the machine's RAM) for the
                              engine, of which the params take their share and the KV pool the rest
                              (vLLM's --gpu-memory-utilization; compiled code and step activations are
                              not counted, so leave them some room);
4. by default                 enough for `max_num_seqs` sequences of max_model_len tokens, at most
                              DEFAULT_KV_CACHE_BYTES (2 GiB).

max_model_len, when not given, is the model's own length (max_position_embeddings) if the pool holds
one sequence that long, else what the pool holds, and the plan says why (logged at start).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

DEFAULT_KV_CACHE_BYTES = 2 << 30   # cap of the default KV pool (2 GiB) when no size is given

GiB = float(1 << 30)


@dataclass(frozen=True)
class KVPoolPlan:
    num_blocks: int          # physical blocks, the null block 0 included
    block_size: int          # tokens per block
    max_model_len: int
    bytes_per_block: int
    sized_by: str            # which EngineConfig field decided the pool ("default" when none)
    note: str | None = None  # why max_model_len is below the model's length, or a pool too small for it

    @property
    def num_tokens(self) -> int:
        """Tokens the pool holds (the null block holds none)."""
        return (self.num_blocks - 1) * self.block_size

    @property
    def nbytes(self) -> int:
        return self.num_blocks * self.bytes_per_block


def plan_kv_pool(config, model_max_len: int, bytes_per_block: int, params_bytes: int = 0,
                 device_memory: int | None = None) -> KVPoolPlan:
    """config: an EngineConfig. device_memory: bytes of the device (needed with gpu_memory_utilization only;
    default: device_memory_bytes())."""
    want = config.max_model_len
    if want is not None and want > model_max_len:
        raise ValueError(f"max_model_len: {want} exceeds the model's max_position_embeddings {model_max_len}")
    bs = config.block_size
    length = want or model_max_len
    if config.num_kv_blocks is not None:
        blocks, by = config.num_kv_blocks, "num_kv_blocks"
    elif config.kv_cache_memory_bytes is not None:
        blocks, by = config.kv_cache_memory_bytes // bytes_per_block, "kv_cache_memory_bytes"
        if blocks < 2:
            raise ValueError(f"kv_cache_memory_bytes: {config.kv_cache_memory_bytes} holds fewer than 2 blocks "
                             f"of {bytes_per_block} bytes")
    elif config.gpu_memory_utilization is not None:
        total = device_memory if device_memory is not None else device_memory_bytes()
        budget = int(config.gpu_memory_utilization * total) - params_bytes
        blocks, by = max(budget, 0) // bytes_per_block, "gpu_memory_utilization"
        if blocks < 2:
            raise ValueError(f"gpu_memory_utilization: {config.gpu_memory_utilization} of {total / GiB:.2f} GiB "
                             f"leaves no room for the KV cache after the params ({params_bytes / GiB:.2f} GiB); "
                             f"raise it, or size the pool with kv_cache_memory_bytes")
    else:
        full = config.max_num_seqs * -(-length // bs) + 1
        blocks, by = max(2, min(full, DEFAULT_KV_CACHE_BYTES // bytes_per_block)), "default"
    blocks = int(blocks)
    pool_tokens = (blocks - 1) * bs
    note = None
    if want is None:
        length = min(model_max_len, pool_tokens)
        if length < model_max_len:
            note = (f"max_model_len is {length}, not the model's {model_max_len}: the KV pool ({by}) holds "
                    f"{pool_tokens} tokens; give it more memory (kv_cache_memory_bytes, gpu_memory_utilization, "
                    f"num_kv_blocks) or set max_model_len")
    elif want > pool_tokens:
        note = (f"max_model_len {want} exceeds the KV pool's {pool_tokens} tokens ({by}): a sequence that long "
                f"cannot be held; give the pool more memory or lower max_model_len")
    return KVPoolPlan(blocks, bs, length, bytes_per_block, by, note)


def describe(plan: KVPoolPlan, kv_dtype: str, params_bytes: int) -> str:
    """One log line: what the pool holds and what the params take."""
    concurrency = plan.num_tokens / plan.max_model_len
    return (f"KV cache: {plan.num_blocks - 1} blocks x {plan.block_size} tokens = {plan.num_tokens} tokens, "
            f"{plan.nbytes / GiB:.2f} GiB ({kv_dtype}; sized by {plan.sized_by}); max_model_len {plan.max_model_len} "
            f"({concurrency:.1f} sequences of that length fit at once); params {params_bytes / GiB:.2f} GiB")


def device_memory_bytes() -> int:
    """The memory of the first JAX device: its allocator's limit on an accelerator, the machine's RAM on CPU."""
    import jax

    dev = jax.devices()[0]
    stats = dev.memory_stats() if dev.platform != "cpu" else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
