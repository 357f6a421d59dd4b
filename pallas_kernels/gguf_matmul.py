"""GGUF block matmul on GPU (Pallas, Triton backend): x @ W for W held as a .gguf file's Q8_0 / Q4_0 /
Q4_1 blocks (jaxpaged.gguf_blocks: [(L,) N, row_bytes] uint8, a row of K / 32 blocks per output n),
each block decoded in registers; nothing float of the weight's size is ever written.

Math: jaxpaged.gguf_blocks.GGUFBlocks.matmul's (its jnp reference): x widened to f32, dotted in f32 with
the dequantized weight; result [M, N] f32. Kernel: grid (M blocks, N blocks); program (i, j) loops over
the K / 32 blocks of its BN weight rows: it gathers each row's block bytes (index arrays: block kb of
row n starts at byte kb * size), rebuilds the f16 scale(s) from their two little-endian bytes, widens
the int8 values / nibbles (input t of a Q4 block: byte 2 + t % 16 (Q4_0) / 4 + t % 16 (Q4_1), shifted
by 4 * (t // 16)), and multiplies the [BM, 32] x tile with the decoded [BN, 32] block transposed.
Rows of W past N are read clamped to N - 1 (their outputs are cut off), x is zero-padded to BM rows.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

BLOCK = 32
BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}


def _f16(lo, hi):
    """Two uint8 arrays (little-endian halves) -> the f16 they spell, as f32."""
    bits = lo.astype(jnp.uint16) | (hi.astype(jnp.uint16) << 8)
    return lax.bitcast_convert_type(bits, jnp.float16).astype(jnp.float32)


def _kernel(layer_ref, x_ref, w_ref, o_ref, *, qtype, block_m, block_n, n, num_kb):
    # grid (Mp / BM, cdiv(N, BN))
    # layer_ref [1] i32; x_ref [Mp, K] f32 (zero-padded rows); w_ref [L, N, row_bytes] uint8, in HBM
    # o_ref [BM, BN] f32: this program's output tile
    i, j = pl.program_id(0), pl.program_id(1)
    layer = layer_ref[0]
    size = BLOCK_BYTES[qtype]
    rows = pl.ds(pl.multiple_of(i * block_m, block_m), block_m)
    row = jnp.minimum(j * block_n + lax.broadcasted_iota(jnp.int32, (block_n, BLOCK), 0), n - 1)  # [BN, 32]
    inp = lax.broadcasted_iota(jnp.int32, (block_n, BLOCK), 1)                                    # input t
    row1 = jnp.minimum(j * block_n + lax.broadcasted_iota(jnp.int32, (block_n,), 0), n - 1)      # [BN]

    def k_step(kb, acc):
        base = kb * size                                   # first byte of block kb in each row
        d = _f16(w_ref[layer, row1, base], w_ref[layer, row1, base + 1])[:, None]       # [BN, 1]
        if qtype == "Q8_0":
            q = lax.bitcast_convert_type(w_ref[layer, row, base + 2 + inp], jnp.int8)
            w = d * q.astype(jnp.float32)
        else:
            first = 2 if qtype == "Q4_0" else 4
            byte = w_ref[layer, row, base + first + lax.rem(inp, 16)]
            nib = ((byte >> (4 * lax.div(inp, 16)).astype(jnp.uint8)) & 0x0F).astype(jnp.float32)
            if qtype == "Q4_0":
                w = d * (nib - 8.0)
            else:
                w = d * nib + _f16(w_ref[layer, row1, base + 2], w_ref[layer, row1, base + 3])[:, None]
        x = x_ref[rows, pl.ds(pl.multiple_of(kb * BLOCK, BLOCK), BLOCK)]                     # [BM, 32]
        return acc + jnp.dot(x, w.T, preferred_element_type=jnp.float32, precision=lax.Precision.HIGHEST)

    o_ref[...] = lax.fori_loop(0, num_kb, k_step, jnp.zeros((block_m, block_n), jnp.float32))


@functools.partial(jax.jit, static_argnames=("qtype", "interpret"))
def gguf_matmul(x: jax.Array, data: jax.Array, layer=None, *, qtype: str, interpret: bool | None = None):
    """x [M, K] @ blocks data [(L,) N, K / 32 * size] uint8 of `qtype` (layer: int32 scalar of a stacked
    data, default 0) -> [M, N] f32. interpret=None: interpret mode on CPU, Triton otherwise."""
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    if qtype not in BLOCK_BYTES:
        raise ValueError(f"gguf_matmul: qtype must be one of {sorted(BLOCK_BYTES)}, got {qtype!r}")
    d3 = data if data.ndim == 3 else data[None]
    size = BLOCK_BYTES[qtype]
    num_kb = d3.shape[-1] // size
    if x.ndim != 2 or d3.dtype != jnp.uint8 or d3.shape[-1] % size or x.shape[1] != num_kb * BLOCK:
        raise ValueError(f"gguf_matmul: expected x [M, {num_kb * BLOCK}] and {qtype} blocks [(L,) N, "
                         f"{num_kb} * {size}] uint8; got x {x.shape}, data {data.shape} {data.dtype}")
    m, n = x.shape[0], d3.shape[1]
    block_m = 16 if m <= 16 else (32 if m <= 32 else 64)
    block_n = 64
    mp, np_ = -(-m // block_m) * block_m, -(-n // block_n) * block_n
    xp = jnp.pad(x.astype(jnp.float32), ((0, mp - m), (0, 0)))
    layer_arr = jnp.asarray(0 if layer is None else layer, jnp.int32).reshape(1)
    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    out = pl.pallas_call(
        functools.partial(_kernel, qtype=qtype, block_m=block_m, block_n=block_n, n=n, num_kb=num_kb),
        out_shape=jax.ShapeDtypeStruct((mp, np_), jnp.float32),
        grid=(mp // block_m, np_ // block_n),
        in_specs=[any_spec] * 3,
        out_specs=pl.BlockSpec((block_m, block_n), lambda i, j: (i, j)),
        interpret=interpret,
        compiler_params=None if interpret else pl_triton.CompilerParams(num_warps=4, num_stages=3),
        name=f"gguf_matmul_{qtype.lower()}",
    )(layer_arr, xp, d3)
    return out[:m, :n]
