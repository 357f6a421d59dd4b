"""Weight quantization schemes (EngineConfig.quantization): stored forms of Linear weights.

"int8": weight-only int8, symmetric per output channel. A Linear kernel w [(L,) K, N] becomes
q [(L,) K, N] int8 and scale [(L,) N] f32 with w ~= q * scale (scale = max_k |w[k, n]| / 127), so
q * scale reproduces every channel's largest weight exactly and the rest within scale / 2.
Activations stay in the model's dtype: y = (x @ q) * scale, accumulated in f32. The LM head and
the embedding stay unquantized (as vLLM's int8 schemes keep them by default).
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from jaxpaged.weights import Weight


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Int8Weight(Weight):
    """Weight-only int8 with a scale per output channel (see the module docstring)."""
    q: jax.Array             # [(L,) K, N] int8
    scale: jax.Array         # [(L,) N] f32

    def value(self) -> jax.Array:
        return self.q.astype(jnp.float32) * self.scale[..., None, :]

    def matmul(self, x: jax.Array, rows=None) -> jax.Array:
        # int8 values are exact in bf16 and f32: the dot runs in x's dtype, the scale after it
        y = jnp.dot(x, self.q.astype(x.dtype), preferred_element_type=jnp.float32)
        return y * self.scale

    @property
    def shape(self):
        return self.q.shape

    def nbytes(self) -> int:
        return self.q.size + 4 * self.scale.size


@jax.jit
def quantize_int8(w: jax.Array) -> Int8Weight:
    """w [(L,) K, N] float -> Int8Weight (per output channel n, over the input axis K)."""
    wf = w.astype(jnp.float32)
    amax = jnp.max(jnp.abs(wf), axis=-2)                              # [(L,) N]
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    q = jnp.clip(jnp.round(wf / scale[..., None, :]), -127, 127).astype(jnp.int8)
    return Int8Weight(q, scale)
