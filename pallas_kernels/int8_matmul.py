"""Weight-only int8 matmul on GPU (Pallas, Triton backend): y = (x @ q) * scale, accumulated in f32.

The math is jaxpaged.quantization.Int8Weight's (`int8_matmul_reference` here): x [M, K] float,
q [K, N] int8, scale [N] f32 (one per output channel); the result is [M, N] f32. int8 values are
exact in bf16 and f32, so the dot runs in x's dtype (f32: full precision, no TF32) and the scale
multiplies the f32 accumulator once per output tile.

Kernel. Grid (M blocks, N blocks): program (i, j) owns output tile [i*BM, +BM) x [j*BN, +BN) and
loops over K in steps of BK, loading an x tile [BM, BK] and a weight tile [BK, BN] int8, which is
widened in registers (int8 -> f32 -> x's dtype) right before the dot; HBM holds only the int8
weights. A stacked weight [L, Kp, Np] is read at its layer in place (`layer`, an int32 operand), so
the layer scan hands the kernel the whole stack and no per-layer copy is made.

Shapes. Triton tiles are powers of two: the weight is zero-padded once at load (`pad_weight`: K and
N up to multiples of PAD = 64; padded rows are zero so they add nothing, padded columns are cut off);
x is zero-padded per call to [Mp, Kp] (Mp a multiple of BM; small: x is activations). Decode steps
(M <= 64) use BM = 16 / 32 / 64 (the smallest power of two >= M, at least 16: Triton's dot minimum);
longer steps BM = 64 and BN = 128 where Np allows. interpret=True runs the same kernel on CPU (tests).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

PAD = 64          # K and N of a stored weight are padded to multiples of this (pad_weight)


@dataclasses.dataclass(frozen=True)
class Int8Tiling:
    """Static tile sizes of one kernel instance (part of the jit key)."""
    block_m: int         # BM: rows of x per program (power of two, >= 16)
    block_n: int         # BN: output columns per program (divides Np)
    block_k: int         # BK: K step of the inner loop (divides Kp)
    num_warps: int = 4
    num_stages: int = 3  # software pipelining depth of the K loop (Triton)


def int8_tiling(m: int, kp: int, np_: int) -> Int8Tiling:
    """The tiling for x [m, *] against a padded weight [kp, np_] (multiples of PAD)."""
    block_m = 16 if m <= 16 else (32 if m <= 32 else 64)
    block_n = 128 if (m > 64 and np_ % 128 == 0) else 64
    block_k = 128 if kp % 128 == 0 else 64
    return Int8Tiling(block_m, block_n, block_k, num_warps=4, num_stages=4 if m <= 64 else 3)


def pad_weight(q: jax.Array, scale: jax.Array) -> tuple[jax.Array, jax.Array]:
    """q [(L,) K, N] int8, scale [(L,) N] -> the same zero-padded to K, N multiples of PAD (once, at load).
    Padded scale columns are 0 (their outputs are cut off anyway)."""
    k, n = q.shape[-2:]
    kp, np_ = -(-k // PAD) * PAD, -(-n // PAD) * PAD
    lead = [(0, 0)] * (q.ndim - 2)
    return (jnp.pad(q, (*lead, (0, kp - k), (0, np_ - n))),
            jnp.pad(scale.astype(jnp.float32), (*lead, (0, np_ - n))))


def int8_matmul_reference(x: jax.Array, q: jax.Array, scale: jax.Array) -> jax.Array:
    """x [M, K] @ q [K, N] int8, times scale [N] -> [M, N] f32 (quantization.Int8Weight.matmul's math)."""
    y = jnp.dot(x, q.astype(x.dtype), preferred_element_type=jnp.float32)
    return y * scale


def _kernel(layer_ref, x_ref, q_ref, s_ref, o_ref, *, t: Int8Tiling, num_k: int, dot_dtype, precision):
    # grid (Mp / BM, Np / BN)
    # layer_ref [1] i32        layer of the stacked weight
    # x_ref [Mp, Kp]           activations (dot dtype), zero-padded
    # q_ref [L, Kp, Np] int8   the whole stacked weight, in HBM (pl.ANY)
    # s_ref [L, Np] f32        per-column scales
    # o_ref [BM, BN] f32       this program's output tile (BlockSpec)
    i, j = pl.program_id(0), pl.program_id(1)
    layer = layer_ref[0]
    rows = pl.ds(pl.multiple_of(i * t.block_m, t.block_m), t.block_m)
    cols = pl.ds(pl.multiple_of(j * t.block_n, t.block_n), t.block_n)

    def k_step(kb, acc):
        ks = pl.ds(pl.multiple_of(kb * t.block_k, t.block_k), t.block_k)
        x = x_ref[rows, ks]                                               # [BM, BK]
        w = q_ref[layer, ks, cols].astype(jnp.float32).astype(dot_dtype)  # [BK, BN] int8 widened here
        return acc + jnp.dot(x, w, preferred_element_type=jnp.float32, precision=precision)

    acc = lax.fori_loop(0, num_k, k_step, jnp.zeros((t.block_m, t.block_n), jnp.float32))
    o_ref[...] = acc * s_ref[layer, cols][None, :]


@functools.partial(jax.jit, static_argnames=("n", "interpret", "tiling"))
def int8_matmul(x: jax.Array, q: jax.Array, scale: jax.Array, layer=None, *, n: int | None = None,
                interpret: bool | None = None, tiling: Int8Tiling | None = None) -> jax.Array:
    """x [M, K] float @ q [(L,) Kq, Nq] int8 (Kq >= K: rows past K must be zero) times scale [(L,) Nq]
    f32 -> [M, n] f32 (n: the weight's real columns, default Nq). layer: int32 scalar picking the layer
    of a stacked q (default 0). A weight not padded to PAD is padded here (a copy per call:
    `pad_weight` it once instead). interpret=None: interpret mode on CPU, Triton otherwise."""
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    q3, s2 = (q, scale) if q.ndim == 3 else (q[None], scale[None])
    if x.ndim != 2 or q.dtype != jnp.int8 or x.shape[1] > q3.shape[1] or s2.shape != (q3.shape[0], q3.shape[2]):
        raise ValueError(f"int8_matmul: expected x [M, K<=Kq], q [(L,) Kq, Nq] int8, scale [(L,) Nq]; got "
                         f"x {x.shape}, q {q.shape} {q.dtype}, scale {scale.shape}")
    n = q3.shape[2] if n is None else n
    if q3.shape[1] % PAD or q3.shape[2] % PAD:
        q3, s2 = pad_weight(q3, s2)
    _, kp, np_ = q3.shape
    m = x.shape[0]
    t = tiling or int8_tiling(m, kp, np_)
    mp = -(-m // t.block_m) * t.block_m
    # 16-bit x keeps its dtype (bf16/f16 tensor-core dot); anything else runs in f32 at full precision.
    # Interpret mode: f32 (XLA:CPU's bf16 dot is slow; products of bf16 and int8 are exact in f32).
    dot_dtype = x.dtype if (x.dtype in (jnp.bfloat16, jnp.float16) and not interpret) else jnp.float32
    precision = lax.Precision.HIGHEST if dot_dtype == jnp.float32 else None
    xp = jnp.pad(x.astype(dot_dtype), ((0, mp - m), (0, kp - x.shape[1])))          # [Mp, Kp]
    layer_arr = jnp.asarray(0 if layer is None else layer, jnp.int32).reshape(1)
    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    out = pl.pallas_call(
        functools.partial(_kernel, t=t, num_k=kp // t.block_k, dot_dtype=dot_dtype, precision=precision),
        out_shape=jax.ShapeDtypeStruct((mp, np_), jnp.float32),
        grid=(mp // t.block_m, np_ // t.block_n),
        in_specs=[any_spec] * 4,
        out_specs=pl.BlockSpec((t.block_m, t.block_n), lambda i, j: (i, j)),
        interpret=interpret,
        compiler_params=None if interpret else pl_triton.CompilerParams(num_warps=t.num_warps,
                                                                        num_stages=t.num_stages),
        name="int8_matmul",
    )(layer_arr, xp, q3, s2)
    return out[:m, :n]
