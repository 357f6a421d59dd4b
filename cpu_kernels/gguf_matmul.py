"""GGUF block matmuls on XLA:CPU through the native kernel (gguf_matmul.cc): y = x . W^T for one
layer of a Linear weight kept in llama.cpp's blocks (jaxpaged/gguf_blocks.py), read in place."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from cpu_kernels.build import load

TARGET = "jaxpaged_gguf_matmul"
QTYPES = {"Q8_0": 0, "Q4_0": 1, "Q4_1": 2}


def gguf_matmul(x, blocks, *, qtype: str, layer=None, rows=None):
    """x [M, K] (any float dtype) . blocks [N, RB] or [L, N, RB] (with `layer`, int32 scalar, may be
    traced) uint8 -> [M, N] f32. rows (int32 scalar): x's real rows; the rest come back 0."""
    if qtype not in QTYPES:
        raise ValueError(f"gguf_matmul: qtype must be one of {list(QTYPES)}, got {qtype!r}")
    if blocks.dtype != jnp.uint8 or blocks.ndim not in (2, 3) or x.ndim != 2:
        raise ValueError(f"gguf_matmul: expected x [M, K] and uint8 blocks [(L,) N, RB], got x {x.shape} "
                         f"and blocks {blocks.shape} {blocks.dtype}")
    load("quant")                               # registers the FFI target (compiles on first use)
    if blocks.ndim == 2:
        blocks, layer = blocks[None], 0
    m = x.shape[0]
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((m, blocks.shape[1]), jnp.float32))
    return call(x.astype(jnp.float32), blocks, jnp.asarray(layer, jnp.int32).reshape(1),
                jnp.asarray(m if rows is None else rows, jnp.int32).reshape(1), qtype=np.int32(QTYPES[qtype]))
