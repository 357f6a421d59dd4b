"""Weight matmuls on XLA:CPU against pre-packed weights (matmul.cc): y = x @ W for one layer of a
stacked weight, the weight laid out once at load time in the order the kernel's loops read it.

`PackedWeight` carries the packed array (a pytree node; `layer` is set per scan iteration, see
models/layers.scan_layers) and `packed_matmul` runs it. f32 weights -> [L, Np/32, K, 32] f32;
bf16 weights -> [L, Np/16, Kp/32, 16, 32] uint16 (AMX B tiles). `worthwhile(dtype)` says whether the
native path beats XLA's dot on this CPU (AVX-512 for f32, AMX for bf16, AVX2 + FMA for both).
"""
from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from cpu_kernels.build import load

TARGET = "jaxpaged_matmul"
PACK_FORMAT = 1        # bump when pack()'s layout changes: cached packed weights are keyed by it
_packs = 0             # weights packed by this process (pack_count())


@functools.cache
def caps() -> int:
    """Bit 0: f32 matmuls run on AVX-512; bit 1: bf16 ones on AMX; bit 2: without those, both run on
    AVX2 + FMA register tiles (this CPU, this process)."""
    fn = load().jaxpaged_matmul_caps
    fn.restype = ctypes.c_int
    return int(fn())


def worthwhile(dtype) -> bool:
    """Whether packed native matmuls are the fast path for weights of `dtype` here."""
    dtype = jnp.dtype(dtype)
    if dtype == jnp.float32:
        return bool(caps() & 0b101)
    if dtype == jnp.bfloat16:
        return bool(caps() & 0b110)
    return False


def flavour(dtype) -> str:
    """What a packed weight's layout depends on besides its values: dtype, the kernel caps, the format."""
    return f"{jnp.dtype(dtype).name}-caps{caps()}-p{PACK_FORMAT}"


def pack_count() -> int:
    """How many weights `pack` has packed in this process (a warm start from the cache packs none)."""
    return _packs


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class PackedWeight:
    """A (stacked) [L, K, N] weight in the kernel's layout. `layer` (int32 scalar) selects the
    layer inside a scan; None for an unstacked weight (L = 1). `rows` (int32 scalar): how many
    leading rows of x are real (the rest are bucket padding, skipped, output 0); None: all."""
    data: jax.Array
    layer: jax.Array | None = None
    rows: jax.Array | None = None
    k: int = field(default=0, metadata=dict(static=True))
    n: int = field(default=0, metadata=dict(static=True))

    @property
    def dtype(self):
        return jnp.dtype(jnp.bfloat16 if self.data.dtype == jnp.uint16 else self.data.dtype)

    def at_layer(self, layer, rows=None) -> "PackedWeight":
        return PackedWeight(self.data, layer, rows, self.k, self.n)

    def with_rows(self, rows) -> "PackedWeight":
        return PackedWeight(self.data, self.layer, rows, self.k, self.n)


def pack(w, *, stacked: bool) -> PackedWeight:
    """w [L, K, N] (stacked) or [K, N], f32 or bf16 (or bf16 held as uint16 bits) -> PackedWeight.
    Runs once per weight at load time (numpy: no device memory spike beyond the result)."""
    global _packs
    _packs += 1
    w = np.asarray(w)
    if not stacked:
        w = w[None]
    n_layers, k, n = w.shape
    np_ = -(-n // 32) * 32
    if w.dtype == np.float32:
        w = np.pad(w, ((0, 0), (0, 0), (0, np_ - n)))
        # [L, K, Np/32, 32] -> [L, Np/32, K, 32]: each 32-column panel contiguous in k
        data = np.ascontiguousarray(w.reshape(n_layers, k, np_ // 32, 32).transpose(0, 2, 1, 3))
        return PackedWeight(jnp.asarray(data), None, None, k, n)
    bits = w.view(np.uint16) if w.dtype != np.uint16 else w       # bf16 (ml_dtypes) or its bits
    kp = -(-k // 32) * 32
    bits = np.pad(bits, ((0, 0), (0, kp - k), (0, np_ - n)))
    # row 32kb + 2r + e, column 16j + c -> [L, j, kb, r, c, e]: AMX VNNI tiles [16 rows][16 cols x 2]
    tiles = bits.reshape(n_layers, kp // 32, 16, 2, np_ // 16, 16).transpose(0, 4, 1, 2, 5, 3)
    data = np.ascontiguousarray(tiles.reshape(n_layers, np_ // 16, kp // 32, 16, 32))
    return PackedWeight(jnp.asarray(data), None, None, k, n)


def packed_matmul(x: jax.Array, w: PackedWeight) -> jax.Array:
    """x [M, K] (cast to the weight's dtype) @ W -> [M, N] f32 (rows at/after w.rows are 0)."""
    if x.ndim != 2 or x.shape[1] != w.k:
        raise ValueError(f"packed_matmul: x must be [M, {w.k}], got {x.shape}")
    load()                                         # registers the FFI target (compiles on first use)
    if w.data.dtype == jnp.uint16:
        x = jax.lax.bitcast_convert_type(x.astype(jnp.bfloat16), jnp.uint16)
    else:
        x = x.astype(jnp.float32)
    scalar = lambda v, default: jnp.asarray(default if v is None else v, jnp.int32).reshape(1)
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((x.shape[0], w.n), jnp.float32))
    return call(x, w.data, scalar(w.layer, 0), scalar(w.rows, x.shape[0]))
