"""Multi-LoRA deltas on XLA:CPU through the native kernel (lora_matmul.cc): y + each row's own
adapter's (x @ A) @ B, for one layer of one LoRA target, reading the slot stacks in place and
computing only the slots the rows use, at each slot's own rank."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from cpu_kernels.build import load

TARGET = "jaxpaged_lora_matmul"


def lora_matmul(y, x, a, b, slots, ranks, *, layer, rows=None):
    """y [M, N] + delta -> [M, N] f32, delta[t] = (x[t] @ a[layer, s - 1, :, :r]) @ b[layer, s - 1, :r]
    with s = slots[t] (0: none) and r = ranks[s - 1]. x [M, K]; a [L, S, K, R], b [L, S, R, N] f32;
    slots [M], ranks [S] int32; layer (int32 scalar, may be traced); rows: x's real rows (the rest keep y)."""
    if a.ndim != 4 or b.ndim != 4 or a.dtype != jnp.float32 or b.dtype != jnp.float32:
        raise ValueError(f"lora_matmul: expected f32 a [L, S, K, R] and b [L, S, R, N], got {a.shape} {a.dtype} "
                         f"and {b.shape} {b.dtype}")
    load("lora")                                # registers the FFI target (compiles on first use)
    m = x.shape[0]
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((m, b.shape[3]), jnp.float32), input_output_aliases={0: 0})
    scalar = lambda v: jnp.asarray(v, jnp.int32).reshape(1)
    return call(y.astype(jnp.float32), x.astype(jnp.float32), a, b, slots.astype(jnp.int32),
                ranks.astype(jnp.int32), scalar(layer), scalar(m if rows is None else rows))
