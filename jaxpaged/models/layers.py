"""Shared model math: parameter modules (optionally stacked over layers), norms, RoPE, paged attention.

Every module here can be built "stacked": its params get a leading layer axis [L, ...]. A model
splits its stacked layer module once (graphdef + State) and `jax.lax.scan`s over the State, merging
one layer's slice per iteration, so compile time does not grow with depth.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cpu_kernels.matmul import PackedWeight, packed_matmul
from jaxpaged.config import ModelConfig


def _shape(stack: int | None, *dims: int) -> tuple[int, ...]:
    return ((stack,) if stack else ()) + dims


def read(p: nnx.Param) -> jax.Array:
    """A param's value. bf16 weights may be stored as their uint16 bit patterns (see
    runner.cpu_param_layout): bit-cast back here, inside the layer, so XLA CPU never upcasts a
    whole stacked [L, ...] bf16 array per step."""
    x = p[...]
    return jax.lax.bitcast_convert_type(x, jnp.bfloat16) if x.dtype == jnp.uint16 else x


def _param(shape, dtype, fill: float = 0.0) -> nnx.Param:
    # Params are always filled from a checkpoint; the init value only matters for eval_shape.
    return nnx.Param(jnp.full(shape, fill, dtype))


class Linear(nnx.Module):
    """y = x @ kernel (+ bias). kernel: [in, out] (HF's weight.T)."""

    def __init__(self, d_in: int, d_out: int, *, bias: bool, dtype, stack: int | None = None):
        self.kernel = _param(_shape(stack, d_in, d_out), dtype)
        self.bias = _param(_shape(stack, d_out), dtype) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.kernel.get_value()
        if isinstance(w, PackedWeight):     # pre-packed for the native CPU matmul (runner.pack_weights)
            y = packed_matmul(x, w)
        else:
            y = jnp.dot(x, read(self.kernel), preferred_element_type=jnp.float32)
        if self.bias is not None:
            y = y + read(self.bias).astype(jnp.float32)
        return y.astype(x.dtype)


class Embed(nnx.Module):
    """Token (or position) embedding table. embedding: [N, H]."""

    def __init__(self, num: int, dim: int, *, dtype):
        self.embedding = _param((num, dim), dtype)
        self.dtype = jnp.dtype(dtype)   # the model's: the table may be held wider (runner.cpu_param_layout)

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(read(self.embedding), ids, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """Tied LM head: x [N, H] -> logits [N, V] in f32 (in the table's dtype: f32 when held so)."""
        table = read(self.embedding)
        return jnp.dot(x.astype(table.dtype), table.T, preferred_element_type=jnp.float32)


class RMSNorm(nnx.Module):
    """HF Llama RMSNorm: computed in f32, scaled, cast back to the input dtype."""

    def __init__(self, dim: int, *, eps: float, dtype, stack: int | None = None):
        self.scale = _param(_shape(stack, dim), dtype, 1.0)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (read(self.scale).astype(jnp.float32) * xf).astype(x.dtype)


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
        return (y * read(self.scale).astype(jnp.float32) + read(self.bias).astype(jnp.float32)).astype(x.dtype)


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


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class AttentionMetadata:
    """Where each flat token sits in the paged cache. Built by the runner, shared by all layers."""
    slot_mapping: jax.Array   # [T] int32  block_id * block_size + offset; padding -> null block 0
    block_tables: jax.Array   # [B, W] int32  physical blocks of each sequence
    seq_lens: jax.Array       # [B] int32  context length incl. this step's tokens; 0 for padding
    query_start: jax.Array    # [B+1] int32  cumulative query offsets into the flat batch


@dataclass(frozen=True)
class AttentionOptions:
    """Static (hashable) attention settings for one model/engine."""
    sm_scale: float
    sliding_window: int | None = None
    backend: str = "pallas"   # "native" (cpu_kernels), "pallas" or "jnp" (the references); see attention_kernels
    mesh: Any = None          # jax.sharding.Mesh ("tp" axis) under tensor parallelism (sharding.py), else None

    @property
    def tp_size(self) -> int:
        return 1 if self.mesh is None else self.mesh.size


def attention_kernels(backend: str):
    """(kv write, attention) functions of a backend; all share pallas_kernels' contracts.

    "native": the C++ attention of cpu_kernels (XLA:CPU only) and XLA's row scatter for the write
    (the interpreted Pallas write is an element-wise scatter, ~10x slower on CPU);
    "pallas": both Pallas kernels (interpret mode on CPU); "jnp": both references.
    """
    from pallas_kernels import kv_cache_write, kv_cache_write_reference
    from pallas_kernels import ragged_paged_attention, ragged_paged_attention_reference

    if backend == "native":
        from cpu_kernels import ragged_paged_attention_cpu
        return kv_cache_write_reference, ragged_paged_attention_cpu
    if backend == "pallas":
        return kv_cache_write, ragged_paged_attention
    if backend == "jnp":
        return kv_cache_write_reference, ragged_paged_attention_reference
    raise ValueError(f"attention backend: expected native, pallas or jnp, got {backend!r}")


def to_cache_dtype(x: jax.Array, cache_dtype) -> jax.Array:
    """New K or V rows in the cache's storage dtype (uint16 = bf16 bit patterns, native backend)."""
    if cache_dtype == jnp.uint16:
        return jax.lax.bitcast_convert_type(x.astype(jnp.bfloat16), jnp.uint16)
    return x.astype(cache_dtype)


def paged_attention(q, k, v, kv_cache, layer, meta: AttentionMetadata, opts: AttentionOptions):
    """Writes this step's K/V into the paged cache, then attends over it.

    q [T, NH, D]; k, v [T, KVH, D]; kv_cache = (k_pages, v_pages) each [L, KVH, NB, BS, D];
    layer: int32 scalar. Returns (out [T, NH, D], new kv_cache).
    """
    if opts.mesh is not None:   # tensor parallel: the kernels run on each device's own heads (shard_map)
        from jaxpaged.sharding import shard_attention
        local = dataclasses.replace(opts, mesh=None)
        per_shard = shard_attention(lambda *a: paged_attention(*a, local), opts.mesh)
        return per_shard(q, k, v, kv_cache, layer, meta)
    k_pages, v_pages = kv_cache
    out_dtype = q.dtype
    write, attend = attention_kernels(opts.backend)
    k, v = to_cache_dtype(k, k_pages.dtype), to_cache_dtype(v, k_pages.dtype)
    # the cache may be kept wider than the model (bf16 weights, f32 cache on CPU): the kernels take
    # q in the cache's dtype (a uint16 cache holds bf16)
    q = q.astype(jnp.bfloat16 if k_pages.dtype == jnp.uint16 else k_pages.dtype)
    k_pages, v_pages = write(k_pages, v_pages, k, v, meta.slot_mapping, layer=layer)
    out = attend(q, k_pages, v_pages, meta.block_tables, meta.seq_lens, meta.query_start,
                 sm_scale=opts.sm_scale, sliding_window=opts.sliding_window, layer=layer)
    return out.astype(out_dtype), (k_pages, v_pages)


def scan_layers(layers: nnx.Module, body, carry, valid_rows=None):
    """Runs body(layer_module, layer_index, carry) -> carry over a stacked layer module with lax.scan.

    Plain leaves are sliced per layer by the scan. PackedWeight leaves are not: the kernel reads
    its layer of the whole stacked array in place (a slice handed to a custom call is a copy), so
    each iteration gets the full array with `layer` set to the iteration's index, and `rows` to
    valid_rows (int32 scalar: the flat batch's real tokens; the packed matmul skips the rest)."""
    graphdef, state = nnx.split(layers)
    is_packed = lambda x: isinstance(x, PackedWeight)
    leaves, treedef = jax.tree_util.tree_flatten(state, is_leaf=is_packed)
    packed = {i: leaf for i, leaf in enumerate(leaves) if is_packed(leaf)}
    sliced = [None if i in packed else leaf for i, leaf in enumerate(leaves)]
    num_layers = (leaves[0].data if is_packed(leaves[0]) else leaves[0]).shape[0]

    def step(c, xs):
        layer_leaves, idx = xs
        merged = [packed[i].at_layer(idx, valid_rows) if i in packed else leaf
                  for i, leaf in enumerate(layer_leaves)]
        layer_state = jax.tree_util.tree_unflatten(treedef, merged)
        return body(nnx.merge(graphdef, layer_state), idx, c), None

    carry, _ = jax.lax.scan(step, carry, (sliced, jnp.arange(num_layers, dtype=jnp.int32)))
    return carry
