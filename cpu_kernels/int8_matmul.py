"""Weight-only int8 matmuls on XLA:CPU against pre-packed weights (int8_matmul.cc): y = (x @ q) * scale
for one layer of a stacked int8 weight (jaxpaged/quantization.py's Int8Weight), packed once at load.

Layout: int8 [L, Np/32, 32 K + 128]: per 32-column panel its K x 32 int8 weights (row-major in k)
followed by the 32 columns' f32 scales as bytes; N padded to Np (a multiple of 32) with zero columns
of scale 1. x: f32 or bf16 (widened to f32 in the kernel); the output is f32.
"""
from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from cpu_kernels.build import load

TARGET = "jaxpaged_int8_matmul"
PACK_FORMAT = 1        # bump when pack_int8()'s layout changes: cached packed weights are keyed by it
PANEL = 32


@functools.cache
def caps() -> int:
    """Bit 2: the kernel runs AVX2 + FMA register tiles here (0: its portable loops)."""
    fn = load("quant").jaxpaged_int8_matmul_caps
    fn.restype = ctypes.c_int
    return int(fn())


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class PackedInt8Weight:
    """A (stacked) int8 weight [L, K, N] with its per-column scales, in the kernel's layout. `layer`
    (int32 scalar) selects the layer inside a scan (None: L = 1); `rows` (int32 scalar): how many
    leading rows of x are real (the rest: skipped, output 0); None: all."""
    data: jax.Array                    # [L, Np/32, 32 K + 128] int8
    layer: jax.Array | None = None
    rows: jax.Array | None = None
    k: int = field(default=0, metadata=dict(static=True))
    n: int = field(default=0, metadata=dict(static=True))

    def at_layer(self, layer, rows=None) -> "PackedInt8Weight":
        return PackedInt8Weight(self.data, layer, rows, self.k, self.n)

    def with_rows(self, rows) -> "PackedInt8Weight":
        return PackedInt8Weight(self.data, self.layer, rows, self.k, self.n)


def pack_int8(q, scale, *, stacked: bool) -> PackedInt8Weight:
    """q [L, K, N] int8 + scale [L, N] f32 (stacked), or [K, N] + [N] -> PackedInt8Weight (numpy, once
    per weight at load time)."""
    q, scale = np.asarray(q, np.int8), np.asarray(scale, np.float32)
    if not stacked:
        q, scale = q[None], scale[None]
    n_layers, k, n = q.shape
    if scale.shape != (n_layers, n):
        raise ValueError(f"pack_int8: scale must be [{n_layers}, {n}], got {scale.shape}")
    np_ = -(-n // PANEL) * PANEL
    q = np.pad(q, ((0, 0), (0, 0), (0, np_ - n)))
    scale = np.pad(scale, ((0, 0), (0, np_ - n)), constant_values=1.0)
    # [L, K, Np/32, 32] -> [L, Np/32, K * 32]: each panel contiguous in k
    panels = q.reshape(n_layers, k, np_ // PANEL, PANEL).transpose(0, 2, 1, 3).reshape(n_layers, np_ // PANEL, -1)
    scales = np.ascontiguousarray(scale.astype("<f4")).reshape(n_layers, np_ // PANEL, PANEL).view(np.int8)
    data = np.concatenate([panels, scales], axis=-1)          # [L, Np/32, 32 K + 128]
    return PackedInt8Weight(jnp.asarray(data), None, None, k, n)


def int8_matmul(x: jax.Array, w: PackedInt8Weight) -> jax.Array:
    """x [M, K] (f32, or bf16; other dtypes cast to f32) @ W -> [M, N] f32 (rows at/after w.rows are 0)."""
    load("quant")                                  # registers the FFI target (compiles on first use)
    if x.ndim != 2 or x.shape[1] != w.k:
        raise ValueError(f"int8_matmul: x must be [M, {w.k}], got {x.shape}")
    if x.dtype == jnp.bfloat16:
        x = jax.lax.bitcast_convert_type(x, jnp.uint16)
    else:
        x = x.astype(jnp.float32)
    scalar = lambda v, default: jnp.asarray(default if v is None else v, jnp.int32).reshape(1)
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((x.shape[0], w.n), jnp.float32))
    return call(x, w.data, scalar(w.layer, 0), scalar(w.rows, x.shape[0]))
