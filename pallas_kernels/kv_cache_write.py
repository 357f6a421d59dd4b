"""KV-cache write: scatters this step's new K/V rows into the paged cache by slot index.

A token's slot is `block_id * block_size + offset`; padding tokens carry slots inside
the null block 0, so they land there and nobody reads them. The grid is
(token tile, KV-head block); each program gathers its tile's new rows and stores
them row by row at (layer, head, slot // BS, slot % BS). The cache buffers are
aliased to the outputs (input_output_aliases), so under jit with the cache
donated the write happens in place, and with a 5-D cache the traced `layer`
picks the layer inside the kernel (no per-layer copy under `lax.scan`).

Tilings: on GPU (Triton) a tile is 16 tokens of one KV head, the overrun of the
last tile masked at the store; in interpret mode (CPU) one program takes every
token and head, which the interpreter turns into a single scatter (an element-wise
one: slower than the reference's row scatter, ~1.5 ms per 1k tokens x 2 heads x 64).
XLA:CPU upcasts a bf16/f16 scatter to f32 around the whole cache: use f32 on CPU.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

_GPU_TOKEN_TILE = 16


# ----------------------------------------------------------------------------- kernel body


def _kv_cache_write_kernel(layer_ref, slots_ref, k_new_ref, v_new_ref, k_in_ref, v_in_ref,
                           k_out_ref, v_out_ref, *, token_tile, heads, block_size, cols):
    # grid (cdiv(T, token_tile), KVH // heads)
    # layer_ref [1] i32              layer of the cache to write (0 for a per-layer cache)
    # slots_ref [T] i32              slot = block * BS + offset of each new token
    # k_new_ref / v_new_ref [T, KVH, D]  this step's keys / values
    # k_in_ref / v_in_ref [L, KVH, NB, BS, D]  aliased to the outputs; not read
    # k_out_ref / v_out_ref [L, KVH, NB, BS, D]  the cache, written in place (pl.ANY)
    del k_in_ref, v_in_ref
    num_tokens, _, d = k_new_ref.shape
    layer = layer_ref[0]
    t0 = pl.program_id(0) * token_tile
    h0 = pl.program_id(1) * heads
    # index arrays over the tile: [TT, Dp] for one head (2-D, Triton), [TT, H, Dp] for several;
    # Dp = cols >= D (a power of two on GPU): columns past D are clamped and never stored
    shape = (token_tile, cols) if heads == 1 else (token_tile, heads, cols)
    tok = t0 + lax.broadcasted_iota(jnp.int32, shape, 0)
    col_p = lax.broadcasted_iota(jnp.int32, shape, len(shape) - 1)
    col = jnp.minimum(col_p, d - 1)
    head = h0 if heads == 1 else h0 + lax.broadcasted_iota(jnp.int32, shape, 1)
    in_range = tok < num_tokens
    tok = jnp.minimum(tok, num_tokens - 1)         # the last tile's overrun re-reads token T-1 ...
    slot = jnp.where(in_range, slots_ref[tok], 0)  # ... and aims at the null block (store masked anyway)
    if cols != d:    # padding columns aim at the null block: a masked store may still touch its address
        slot = jnp.where(col_p < d, slot, lax.rem(slot, block_size))
    blk, off = lax.div(slot, block_size), lax.rem(slot, block_size)
    # Stores are masked only when a tile can overrun T; in interpret mode tiles divide T exactly.
    mask = None if num_tokens % token_tile == 0 else in_range
    if cols != d:
        mask = (col_p < d) if mask is None else mask & (col_p < d)
    pl_triton.store(k_out_ref.at[layer, head, blk, off, col], k_new_ref[tok, head, col], mask=mask)
    pl_triton.store(v_out_ref.at[layer, head, blk, off, col], v_new_ref[tok, head, col], mask=mask)


# ----------------------------------------------------------------------------- pallas_call wrapper


def _kv_cache_write_call(k5, v5, k_new, v_new, slot_mapping, layer_arr, *, interpret: bool,
                         tile: tuple[int, int] | None):
    """k5/v5 [L, KVH, NB, BS, D]; k_new/v_new [T, KVH, D]; returns the updated (k5, v5)."""
    num_tokens, num_kv_heads, _ = k_new.shape
    if tile is not None:
        token_tile, heads = tile
    elif interpret:
        token_tile, heads = num_tokens, num_kv_heads          # one program: one scatter
    else:
        token_tile, heads = _GPU_TOKEN_TILE, 1
    if num_kv_heads % heads:
        raise ValueError(f"kv_cache_write: tile {tile} does not divide {num_kv_heads} KV heads")
    d = k5.shape[-1]
    cols = d if heads > 1 else max(pl.next_power_of_2(d), 16)   # Triton (one head) tiles are powers of two
    kernel = functools.partial(_kv_cache_write_kernel, token_tile=token_tile, heads=heads,
                               block_size=k5.shape[3], cols=cols)
    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    params = None if interpret else pl_triton.CompilerParams(num_warps=2, num_stages=1)
    return pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct(k5.shape, k5.dtype), jax.ShapeDtypeStruct(v5.shape, v5.dtype)),
        grid=(pl.cdiv(num_tokens, token_tile), num_kv_heads // heads),
        in_specs=[any_spec] * 6,
        out_specs=(any_spec, any_spec),
        input_output_aliases={4: 0, 5: 1},
        interpret=interpret,
        compiler_params=params,
        name="kv_cache_write",
    )(layer_arr, slot_mapping, k_new, v_new, k5, v5)


# ----------------------------------------------------------------------------- public function


def _validate(k_pages, v_pages, k_new, v_new, slot_mapping, layer):
    shapes = (f"k_pages {k_pages.shape} {k_pages.dtype}, v_pages {v_pages.shape} {v_pages.dtype}, "
              f"k_new {k_new.shape} {k_new.dtype}, v_new {v_new.shape} {v_new.dtype}, "
              f"slot_mapping {slot_mapping.shape} {slot_mapping.dtype}")

    def fail(why):
        raise ValueError(f"kv_cache_write: {why} (got {shapes})")

    if k_pages.ndim not in (4, 5):
        fail("k_pages must be [KVH, NB, BS, D] or [L, KVH, NB, BS, D]")
    if k_pages.shape != v_pages.shape or k_pages.dtype != v_pages.dtype:
        fail("k_pages and v_pages must have the same shape and dtype")
    if (k_pages.ndim == 5) != (layer is not None):
        fail("a 5-D cache needs `layer`, a 4-D cache takes no `layer`")
    if layer is not None and (jnp.shape(layer) != () or not jnp.issubdtype(jnp.result_type(layer), jnp.integer)):
        fail(f"layer must be an integer scalar, got shape {jnp.shape(layer)}")
    kvh, _, _, d = k_pages.shape[-4:]
    if k_new.ndim != 3 or k_new.shape[1:] != (kvh, d) or v_new.shape != k_new.shape:
        fail(f"k_new and v_new must be [T, {kvh}, {d}]")
    if k_new.dtype != k_pages.dtype or v_new.dtype != k_pages.dtype:
        fail("k_new/v_new must have the cache's dtype")
    if slot_mapping.shape != (k_new.shape[0],) or slot_mapping.dtype != jnp.int32:
        fail(f"slot_mapping must be [{k_new.shape[0]}] int32")


@functools.partial(jax.jit, static_argnames=("interpret", "tile"))
def kv_cache_write(k_pages, v_pages, k_new, v_new, slot_mapping, *, layer=None, interpret=None,
                   tile: tuple[int, int] | None = None):
    """Writes k_new/v_new [T, KVH, D] at slot_mapping [T] (block * BS + offset) into the cache.

    k_pages/v_pages [KVH, NB, BS, D], or [L, KVH, NB, BS, D] with `layer` (int32 scalar, may be
    traced). Returns the updated (k_pages, v_pages); donate them under jit to write in place.
    Slots must be distinct except inside the null block 0 (padding). interpret=None: interpret
    mode when the default backend is CPU, Triton otherwise. `tile` = (tokens, KV heads) per
    program overrides the default tiling (tests run the GPU tiling in interpret mode).
    """
    _validate(k_pages, v_pages, k_new, v_new, slot_mapping, layer)
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    if k_new.shape[0] == 0:
        return k_pages, v_pages
    squeeze = k_pages.ndim == 4
    if squeeze:                                 # one layer: view it as a 1-layer stack (free reshape)
        k_pages, v_pages, layer = k_pages[None], v_pages[None], 0
    layer_arr = jnp.asarray(layer, jnp.int32).reshape(1)
    k5, v5 = _kv_cache_write_call(k_pages, v_pages, k_new, v_new, slot_mapping, layer_arr,
                                  interpret=interpret, tile=tile)
    return (k5[0], v5[0]) if squeeze else (k5, v5)


# ----------------------------------------------------------------------------- reference


def kv_cache_write_reference(k_pages, v_pages, k_new, v_new, slot_mapping, *, layer=None,
                             interpret=None):
    """Plain-jnp scatter with the same contract as kv_cache_write (`interpret` is ignored)."""
    del interpret
    _validate(k_pages, v_pages, k_new, v_new, slot_mapping, layer)
    bs = k_pages.shape[-2]
    blk, off = slot_mapping // bs, slot_mapping % bs
    if k_pages.ndim == 4:
        # advanced indices (blk, off) are adjacent: the indexed view is [KVH, T, D]
        return (k_pages.at[:, blk, off, :].set(k_new.swapaxes(0, 1)),
                v_pages.at[:, blk, off, :].set(v_new.swapaxes(0, 1)))
    # advanced indices (layer, blk, off) are split by a slice: the indexed view is [T, KVH, D]
    return (k_pages.at[layer, :, blk, off, :].set(k_new),
            v_pages.at[layer, :, blk, off, :].set(v_new))
