"""Shared model math: parameter modules (optionally stacked over layers), norms, RoPE, the layer scan.

Every module here can be built "stacked": its params get a leading layer axis [L, ...]. A model
splits its stacked layer module once (graphdef + State) and `jax.lax.scan`s over the State, merging
one layer's slice per iteration, so compile time does not grow with depth. Params are read through
jaxpaged.weights (`value`, `matmul`, `take`, `matmul_t`): how a backend stores them is not seen here.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpaged.config import ModelConfig
from jaxpaged.weights import Weight, matmul, matmul_t, take, value


def _shape(stack: int | None, *dims: int) -> tuple[int, ...]:
    return ((stack,) if stack else ()) + dims


def _param(shape, dtype, fill: float = 0.0) -> nnx.Param:
    # Params are always filled from a checkpoint; the init value only matters for eval_shape.
    return nnx.Param(jnp.full(shape, fill, dtype))


class Linear(nnx.Module):
    """y = x @ kernel (+ bias). kernel: [in, out] (HF's weight.T). `vocab`: the output is over the
    vocabulary (an LM head), which backends may store differently (backends/layout.py)."""

    def __init__(self, d_in: int, d_out: int, *, bias: bool, dtype, stack: int | None = None,
                 vocab: bool = False):
        self.kernel = _param(_shape(stack, d_in, d_out), dtype)
        self.bias = _param(_shape(stack, d_out), dtype) if bias else None
        self.vocab = vocab

    def __call__(self, x: jax.Array, rows=None) -> jax.Array:
        """x [M, in] -> [M, out] in x's dtype (f32 for an LM head). rows: real leading rows of x."""
        y = matmul(x, self.kernel.get_value(), rows)
        if self.bias is not None:
            y = y + value(self.bias.get_value()).astype(jnp.float32)
        return y if self.vocab else y.astype(x.dtype)


class Embed(nnx.Module):
    """Token (or position) embedding table. embedding: [N, H]. `tied_head`: the table is also the
    LM head (`attend`)."""

    def __init__(self, num: int, dim: int, *, dtype, tied_head: bool = False):
        self.embedding = _param((num, dim), dtype)
        self.dtype = jnp.dtype(dtype)   # the model's: the table may be stored otherwise (a backend's choice)
        self.tied_head = tied_head

    def __call__(self, ids: jax.Array) -> jax.Array:
        return take(self.embedding.get_value(), ids).astype(self.dtype)

    def attend(self, x: jax.Array, rows=None) -> jax.Array:
        """Tied LM head: x [N, H] -> logits [N, V] f32. rows: real leading rows of x."""
        return matmul_t(x, self.embedding.get_value(), rows)


class RMSNorm(nnx.Module):
    """HF Llama RMSNorm: computed in f32, scaled, cast back to the input dtype."""

    def __init__(self, dim: int, *, eps: float, dtype, stack: int | None = None):
        self.scale = _param(_shape(stack, dim), dtype, 1.0)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (value(self.scale.get_value()).astype(jnp.float32) * xf).astype(x.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm with scale and bias, computed in f32."""

    def __init__(self, dim: int, *, eps: float, dtype, stack: int | None = None):
        self.scale = _param(_shape(stack, dim), dtype, 1.0)
        self.bias = _param(_shape(stack, dim), dtype)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        scale, bias = value(self.scale.get_value()), value(self.bias.get_value())
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies [D/2] (float64 numpy, a trace-time constant); applies llama3 scaling."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    sc = cfg.rope_scaling_dict
    if sc is None:
        return inv
    # llama3: long wavelengths are divided by `factor`, short ones kept, a smooth ramp in between
    factor, low, high = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
    old_len = sc["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv
    smooth = (old_len / wavelen - low) / (high - low)
    scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
    mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    return np.where(mid, (1 - smooth) * scaled / factor + smooth * scaled, scaled)


def rope_cos_sin(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """positions [T] -> cos, sin [T, D] f32 (HF's rotate-half layout: the D/2 freqs repeated twice)."""
    angles = positions.astype(jnp.float32)[:, None] * jnp.asarray(inv_freq, jnp.float32)[None, :]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [T, N, D]; cos/sin [T, D]. Rotate-half RoPE (HF convention), in f32."""
    xf = x.astype(jnp.float32)
    half = xf.shape[-1] // 2
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    return (xf * cos[:, None, :] + rotated * sin[:, None, :]).astype(x.dtype)


def scan_layers(layers: nnx.Module, body, carry, valid_rows=None):
    """Runs body(layer_module, layer_index, carry) -> carry over a stacked layer module with lax.scan.

    Leaves are sliced per layer by the scan, except weights whose kernel reads its layer of the
    whole stacked array in place (`Weight.sliced_by_scan` False; a slice handed to a custom call is
    a copy): each iteration gets those whole, with the iteration's index as their layer and `rows`
    = valid_rows (int32 scalar: the flat batch's real tokens; such a kernel may skip the rest)."""
    graphdef, state = nnx.split(layers)
    whole = lambda x: isinstance(x, Weight) and not x.sliced_by_scan
    leaves, treedef = jax.tree_util.tree_flatten(state, is_leaf=whole)
    packed = {i: leaf for i, leaf in enumerate(leaves) if whole(leaf)}
    sliced = [None if i in packed else leaf for i, leaf in enumerate(leaves)]
    num_layers = state_num_layers(state)

    def step(c, xs):
        layer_leaves, idx = xs
        merged = [packed[i].at_layer(idx, valid_rows) if i in packed else leaf
                  for i, leaf in enumerate(layer_leaves)]
        layer_state = jax.tree_util.tree_unflatten(treedef, merged)
        return body(nnx.merge(graphdef, layer_state), idx, c), None

    carry, _ = jax.lax.scan(step, carry, (sliced, jnp.arange(num_layers, dtype=jnp.int32)))
    return carry


def state_num_layers(state) -> int:
    """The leading [L] of a stacked layer State (every leaf has it, whatever its storage)."""
    return jax.tree_util.tree_leaves(state)[0].shape[0]
