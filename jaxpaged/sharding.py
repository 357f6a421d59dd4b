"""Tensor parallelism over a 1-D device mesh (axis "tp"): parameter layout, placement and the per-shard attention.

`tensor_parallel_size = N > 1` (EngineConfig) turns this on; N == 1 leaves every code path as it was.

  make_mesh(N)                   Mesh over the first N of jax.devices() (all processes' devices under
                                 jax.distributed), one axis "tp"
  prepare_params(cfg, params, N) host-side (numpy) layout changes the sharding needs, before build_state:
                                 KV heads replicated up to N when KVH < N (vLLM's rule), then the
                                 family's own prepare_tp (if any); returns the (maybe changed) config too
  place_params(state, cfg, mesh) device_put with a NamedSharding per parameter (the family's TP_SPLIT_AXES)
  zeros_kv_cache(shapes, mesh)   the paged cache (k, v) [L, KVH, NB, BS, D] (+ an 8-bit cache's scales
                                 [L, KVH, NB, BS]), every leaf sharded on KVH, allocated in place
  constrain_step_outputs(fn, ..) pins a step's outputs: KV cache stays head-sharded (donation keeps
                                 aliasing), everything else replicated (every process can read it)
  shard_attention(fn, mesh)      runs cache write + ragged attention per shard under jax.shard_map

The model code stays global (SPMD): XLA's partitioner inserts the collectives the layout implies.
Megatron-style layout: q/k/v, gate/up are column-parallel (each device owns whole heads / a slice of the
intermediate dim), o_proj/down are row-parallel (partial sums, one all-reduce each), embedding and LM head
are split by vocabulary, norms are replicated. A dim that does not divide N (vocabulary, intermediate) is
replicated instead; heads must divide (error naming tensor_parallel_size).
"""
from __future__ import annotations

import dataclasses
import logging

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxpaged.config import ModelConfig

logger = logging.getLogger(__name__)

AXIS = "tp"


def kv_specs(kv_cache):
    """PartitionSpecs of a kv_cache pytree: every leaf ([L, KVH, NB, BS, D] pages, [L, KVH, NB, BS]
    scales of an 8-bit cache) split on its KVH axis."""
    return jax.tree_util.tree_map(lambda a: P(None, AXIS, *([None] * (len(a.shape) - 2))), kv_cache)

def make_mesh(tensor_parallel_size: int) -> Mesh | None:
    """A 1-D mesh ("tp") over the first N global devices; None for N == 1 (the unsharded path)."""
    n = int(tensor_parallel_size)
    if n == 1:
        return None
    devices = jax.devices()
    if n > len(devices):
        raise ValueError(f"tensor_parallel_size: {n} exceeds the {len(devices)} available "
                         f"{jax.default_backend()} devices")
    mesh = Mesh(np.array(devices[:n]), (AXIS,))
    if jax.process_count() > 1 and not set(mesh.devices.flat) & set(jax.local_devices()):
        raise ValueError(f"tensor_parallel_size: {n} leaves process {jax.process_index()} without a device "
                         f"in the mesh; with several processes use all {len(devices)} devices")
    return mesh


def check_divisible(cfg: ModelConfig, n: int) -> int:
    """Returns r, the factor KV heads are replicated by (1: none). ValueError when heads do not fit N."""
    if cfg.num_heads % n:
        raise ValueError(f"tensor_parallel_size: {n} must divide the model's {cfg.num_heads} attention heads")
    if cfg.num_kv_heads % n == 0:
        return 1
    if n % cfg.num_kv_heads:
        raise ValueError(f"tensor_parallel_size: {n} must divide the model's {cfg.num_kv_heads} KV heads, "
                         f"or be a multiple of them (then KV heads are replicated)")
    return n // cfg.num_kv_heads


def prepare_params(cfg: ModelConfig, params: dict, n: int) -> tuple[ModelConfig, dict]:
    """Host-side layout for N shards (numpy in, numpy out; N == 1: unchanged).

    - KVH < N (N a multiple of KVH): each KV head's k/v columns are repeated r = N / KVH times and the
      config says KVH * r heads, so every device owns one copy; query head h still reads KV head
      h // (NH / KVH) because (h // (G / r)) // r == h // G. Costs r times the KV cache memory.
    - then the family's `prepare_tp(cfg, params, n)` when it has one (e.g. a fused projection's
      columns regrouped per shard). The params cache keeps the checkpoint's order.
    """
    if n == 1:
        return cfg, params
    r = check_divisible(cfg, n)
    params = jax.tree_util.tree_map(lambda x: x, params)   # new dicts; leaves shared until replaced
    layers = params["layers"]
    if r > 1:
        def repeat_heads(a):          # [..., KVH * D] -> [..., KVH * r * D]
            a = np.asarray(a)
            heads = a.reshape(*a.shape[:-1], cfg.num_kv_heads, cfg.head_dim)
            return np.repeat(heads, r, axis=-2).reshape(*a.shape[:-1], -1)
        for name in ("k_proj", "v_proj"):
            for leaf, arr in layers[name].items():   # a weight type's fields all end in the columns
                layers[name][leaf] = jax.tree_util.tree_map(repeat_heads, arr)
        cfg = dataclasses.replace(cfg, num_kv_heads=cfg.num_kv_heads * r)
        logger.info("tensor_parallel_size %d > %d KV heads: KV heads replicated x%d", n, cfg.num_kv_heads // r, r)
    prepare_tp = getattr(cfg.family, "prepare_tp", None)
    if prepare_tp is not None:
        params = prepare_tp(cfg, params, n)
    return cfg, params


def param_spec(split_axes: dict, path: str, shape: tuple[int, ...], n: int) -> P:
    """PartitionSpec of one parameter ("a/b/c" path) from a family's TP_SPLIT_AXES; replicated when
    it has no split axis or its split dim does not divide N."""
    axis = split_axes.get(path)
    if axis is None:
        return P()
    if shape[axis] % n:
        logger.info("param %s %s: dim %d does not divide tensor_parallel_size %d; replicated",
                    path, shape, shape[axis], n)
        return P()
    spec = [None] * len(shape)
    spec[axis] = AXIS
    return P(*spec)


def param_specs(cfg: ModelConfig, params: dict, n: int) -> dict:
    """The PartitionSpec tree of a params dict (same structure). A param held as a weight type
    (jaxpaged.weights.Weight, e.g. int8 + scales) gets one spec per field, from the type's
    `field_split_axes` (its fields split along with the weight)."""
    from jaxpaged.weights import Weight

    split_axes = dict(cfg.family.TP_SPLIT_AXES)

    def spec(key_path, x):
        path = "/".join(str(getattr(k, "key", k)) for k in key_path)
        if isinstance(x, Weight):
            fields = x.field_split_axes(split_axes.get(path))
            return jax.tree_util.tree_map_with_path(
                lambda kp, leaf: param_spec({"": fields.get(kp[0].name)}, "", tuple(leaf.shape), n), x)
        return param_spec(split_axes, path, tuple(x.shape), n)
    return jax.tree_util.tree_map_with_path(spec, params, is_leaf=lambda x: isinstance(x, Weight))


def place_params(state, cfg: ModelConfig, mesh: Mesh | None):
    """Puts an nnx.State (host arrays) on device(s): one NamedSharding per parameter, or plain device_put."""
    if mesh is None:
        return jax.device_put(state)
    from flax import nnx
    pure = nnx.to_pure_dict(state)
    specs = param_specs(cfg, pure, mesh.size)     # same structure as pure (weight types' fields included)
    placed = jax.tree_util.tree_map(lambda x, s: _put_global(x, NamedSharding(mesh, s)), pure, specs,
                                    is_leaf=lambda s: isinstance(s, P))
    nnx.replace_by_pure_dict(state, placed)
    return state


def _put_global(x, sharding: NamedSharding) -> jax.Array:
    # make_array_from_callback builds only this process's shards (every process holds the same host copy),
    # so it works unchanged when the mesh spans several processes.
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def kv_shardings(kv_cache, mesh: Mesh):
    """NamedShardings of a kv_cache pytree (arrays or ShapeDtypeStructs), every leaf split on KVH."""
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), kv_specs(kv_cache),
                                  is_leaf=lambda s: isinstance(s, P))


def zeros_kv_cache(shapes, mesh: Mesh | None):
    """The cache of zeros from its (k, v) ShapeDtypeStructs (Backend.kv_cache_shapes); with a mesh each
    device allocates only its own heads' pages (and scales)."""
    import jax.numpy as jnp
    zeros = lambda: jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    if mesh is None:
        return zeros()
    heads = jax.tree_util.tree_leaves(shapes)[0].shape[1]
    if heads % mesh.size:
        raise ValueError(f"tensor_parallel_size: {mesh.size} must divide the KV cache's {heads} heads")
    return jax.jit(zeros, out_shardings=kv_shardings(shapes, mesh))()


def constrain_step_outputs(fn, mesh: Mesh | None):
    """Wraps fn(...) -> (kv_cache, *rest): kv_cache kept head-sharded, rest replicated. Identity without a mesh."""
    if mesh is None:
        return fn
    rep = NamedSharding(mesh, P())

    def wrapped(*args, **kwargs):
        kv_cache, *rest = fn(*args, **kwargs)
        kv_cache = jax.lax.with_sharding_constraint(kv_cache, kv_shardings(kv_cache, mesh))
        rest = jax.lax.with_sharding_constraint(rest, jax.tree_util.tree_map(lambda _: rep, rest))
        return (kv_cache, *rest)
    return wrapped


def constrain_kv(fn, mesh: Mesh | None):
    """Wraps fn(...) -> kv_cache so the result keeps the head sharding (the block-copy step)."""
    if mesh is None:
        return fn
    def wrapped(*args):
        kv_cache = fn(*args)
        return jax.lax.with_sharding_constraint(kv_cache, kv_shardings(kv_cache, mesh))
    return wrapped


def shard_attention(fn, mesh: Mesh):
    """fn(q, k, v, kv_cache, layer, meta) on one device's heads, mapped over the mesh with shard_map.

    q [T, NH, D], k/v [T, KVH, D] split on heads; kv_cache leaves split on KVH (kv_specs); layer and the
    metadata (slot mapping, block tables, lengths) replicated. Each shard keeps the GQA ratio NH / KVH,
    so the kernels run unchanged on [T, NH / N, D] and [L, KVH / N, NB, BS, D]. No collectives inside.
    """
    heads = P(None, AXIS, None)

    def run(q, k, v, kv_cache, layer, meta):
        kv = kv_specs(kv_cache)
        return jax.shard_map(fn, mesh=mesh, in_specs=(heads, heads, heads, kv, P(), P()),
                             out_specs=(heads, kv), check_vma=False)(q, k, v, kv_cache, layer, meta)
    return run
