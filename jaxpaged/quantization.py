"""Weight quantization schemes (EngineConfig.quantization): stored forms of Linear weights.

"int8": weight-only int8, symmetric per output channel. A Linear kernel w [(L,) K, N] becomes
q [(L,) K, N] int8 and scale [(L,) N] f32 with w ~= q * scale (scale = max_k |w[k, n]| / 127), so
q * scale reproduces every channel's largest weight exactly and the rest within scale / 2.
Activations stay in the model's dtype: y = (x @ q) * scale, accumulated in f32. The LM head and
the embedding stay unquantized (as vLLM's int8 schemes keep them by default). The converter
quantizes once (`quantize_params`) and caches the result under a key that names the scheme
(convert/cache.py: q and scale stored as two arrays per kernel).
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

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

    def field_split_axes(self, axis: int | None) -> dict:
        # q splits like the weight; the per-output-channel scales only when the output axis splits
        return {"q": axis, "scale": -1 if axis == -1 else None}


def quantize_int8(w: np.ndarray) -> Int8Weight:
    """w [(L,) K, N] float -> Int8Weight (per output channel n, over the input axis K), on the host
    (numpy in, numpy fields out): the converter quantizes once and caches the result."""
    wf = np.asarray(w, np.float32)
    amax = np.abs(wf).max(axis=-2)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(wf / scale[..., None, :]), -127, 127).astype(np.int8)
    return Int8Weight(q, scale)


def int8_kernel_paths(config) -> list[str]:
    """Param paths ("layers/q_proj/kernel") of the decoder layers' Linear kernels: what "int8" quantizes."""
    from flax import nnx

    from jaxpaged.models import abstract_model
    from jaxpaged.models.layers import Linear

    graphdef, state = abstract_model(config)
    out = []
    for path, node in nnx.iter_graph(nnx.merge(graphdef, state)):
        if isinstance(node, Linear) and not node.vocab and len(node.kernel.get_value().shape) == 3:
            out.append("/".join(map(str, path)) + "/kernel")
    return sorted(out)


def quantize_params(config, params: dict, scheme: str) -> dict:
    """The converted params (nested numpy dict) with every decoder Linear kernel quantized (host side)."""
    from jaxpaged.convert.loader import flatten, nest
    if scheme != "int8":
        raise ValueError(f"quantization: {scheme!r} is not applied to converted params")
    flat = flatten(params)
    for path in int8_kernel_paths(config):
        flat[path] = quantize_int8(flat[path])
    return nest(flat)
