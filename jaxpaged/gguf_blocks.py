"""GGUF quantized weights kept in their own block format (EngineConfig.quantization="gguf").

llama.cpp stores a matrix [out, in] as rows of blocks of 32 inputs each; a block holds f16 scale(s)
and the quantized values:
  Q8_0  34 bytes: d (f16), q[32] int8                 w = d * q
  Q4_0  18 bytes: d (f16), 16 bytes of nibbles        w = d * (nibble - 8)
  Q4_1  20 bytes: d (f16), m (f16), 16 bytes          w = d * nibble + m
(nibbles: byte j holds input j in its low 4 bits and input j + 16 in its high 4 bits).
`GGUFBlocks` keeps those bytes as they are in the file ([(L,) out, row_bytes] uint8, never
expanded to float in memory) and dequantizes one layer's rows inside the step, right before its
matmul: memory is what it saves (Q4_1: 0.625 bytes per weight, 0.16x of float32).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import jax
import jax.numpy as jnp

from jaxpaged.weights import Weight

BLOCK = 32
BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}      # the block types kept as they are


def _f16(b: jax.Array) -> jax.Array:
    """[..., 2] uint8 (little-endian) -> [...] f32."""
    return jax.lax.bitcast_convert_type(b, jnp.float16).astype(jnp.float32)


def _nibbles(qs: jax.Array) -> jax.Array:
    """[..., 16] uint8 -> [..., 32] f32: low nibbles (inputs 0..15), then high (16..31)."""
    return jnp.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(jnp.float32)


def dequantize(data: jax.Array, qtype: str) -> jax.Array:
    """data [..., rows, row_bytes] uint8 -> [..., rows, row_bytes / block_bytes * 32] f32."""
    size = BLOCK_BYTES[qtype]
    b = data.reshape(*data.shape[:-1], data.shape[-1] // size, size)       # [..., rows, blocks, size]
    d = _f16(b[..., 0:2])[..., None]
    if qtype == "Q8_0":
        w = d * jax.lax.bitcast_convert_type(b[..., 2:], jnp.int8).astype(jnp.float32)
    elif qtype == "Q4_0":
        w = d * (_nibbles(b[..., 2:]) - 8.0)
    else:                                                                   # Q4_1
        w = d * _nibbles(b[..., 4:]) + _f16(b[..., 2:4])[..., None]
    return w.reshape(*data.shape[:-1], -1)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class GGUFBlocks(Weight):
    """A Linear kernel, logically [(L,) K, N], held as the file's blocks [(L,) N, K / 32 * bytes]."""
    data: jax.Array                                          # [(L,) N, row_bytes] uint8
    qtype: str = field(default="Q4_1", metadata=dict(static=True))

    def value(self) -> jax.Array:
        return jnp.swapaxes(dequantize(self.data, self.qtype), -1, -2)       # [(L,) K, N]

    def matmul(self, x: jax.Array, rows=None) -> jax.Array:
        w = dequantize(self.data, self.qtype)                                # [N, K] f32 (one layer)
        return jnp.dot(x.astype(jnp.float32), w.T, preferred_element_type=jnp.float32)

    @property
    def shape(self) -> tuple[int, ...]:
        *lead, n, row_bytes = self.data.shape
        return (*lead, row_bytes // BLOCK_BYTES[self.qtype] * BLOCK, n)

    def nbytes(self) -> int:
        return self.data.size


class KernelBlocks(Weight):
    """Base of a backend's stacked GGUF blocks (a registered dataclass with fields `blocks`, a stacked
    GGUFBlocks [L, N, row_bytes], and `layer`) multiplied by that backend's block kernel, which reads
    its layer in place (so the layer scan does not slice it). Steps of more than `kernel_max_rows`
    rows, and value(), take the blocks' jnp path. A subclass gives `_kernel(x, rows)` and `at_layer`."""
    sliced_by_scan = False
    kernel_max_rows = 64

    def layer_blocks(self) -> GGUFBlocks:
        """This layer's blocks [N, row_bytes] (the whole stack when no layer is set)."""
        data = self.blocks.data if self.layer is None else jax.lax.dynamic_index_in_dim(
            self.blocks.data, self.layer, 0, keepdims=False)
        return GGUFBlocks(data, self.blocks.qtype)

    def value(self) -> jax.Array:
        return self.layer_blocks().value()

    def matmul(self, x: jax.Array, rows=None) -> jax.Array:
        if x.shape[0] > self.kernel_max_rows:
            return self.layer_blocks().matmul(x)
        return self._kernel(x, rows)

    def _kernel(self, x: jax.Array, rows) -> jax.Array:
        raise NotImplementedError

    @property
    def shape(self) -> tuple[int, ...]:
        return self.blocks.shape

    def nbytes(self) -> int:
        return self.blocks.nbytes()
