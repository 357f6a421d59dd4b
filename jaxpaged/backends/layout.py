"""How a model's params are stored for a backend, decided once at load (`lay_out_params`).

Rules, by the layer type that owns the param (models/layers.py):
  - a backend with its own matmul (`backend.packs_weights`) gets every stacked Linear kernel and the
    LM head packed (`backend.pack`); a tied embedding keeps its table for the lookup and gains the
    packed head beside it (weights.TiedEmbedding); stacked int8 kernels (quantization.Int8Weight,
    quantized by the converter) go to the backend's packed int8 form the same way;
  - a backend with an int8 kernel but no packed weights (`backend.int8_kernel`: Pallas on GPU) gets
    every stacked int8 kernel in its own form (`backend.int8_weight`);
  - on XLA:CPU, without packed weights, vocabulary-sized tables (embedding, LM head) of a bf16
    model are held in f32: XLA CPU's bf16 dot of a few rows against [H, V] ran at ~3 GB/s
    (SmolLM2's head: 32-43 ms at B=4..64), the f32 one in 8-18 ms;
  - on XLA:CPU every other bf16 param is held as its bit patterns (weights.BF16Bits): a bf16 array
    sliced inside the layer scan is widened whole on every call, uint16 bits are sliced as is.
Elsewhere (GPU/TPU) params stay as converted.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpaged.gguf_blocks import GGUFBlocks
from jaxpaged.models.layers import Embed, Linear
from jaxpaged.quantization import Int8Weight
from jaxpaged.weights import BF16Bits, TiedEmbedding


def lay_out_params(graphdef, state, backend, *, platform: str, pack: bool, packed_cache=None,
                   native_blocks: bool = False, int8_kernel: bool = False):
    """(graphdef, State) -> (graphdef, State) with every param in the backend's storage form.
    pack: Linear kernels and the LM head go to the backend's packed form (backend.pack), stacked int8
    kernels (quantization.Int8Weight) to its packed int8 form. Other params that arrive as a weight
    type already (GGUF blocks) are kept as they are.
    packed_cache: a convert.packed_cache.PackedCache of the params' cache entry for this backend's
    flavour: packed forms are read from it, and the ones it lacks are packed and added to it.
    native_blocks: stacked GGUF blocks go to the backend's block kernel (backend.blocks).
    int8_kernel: stacked int8 kernels go to the backend's int8 matmul (backend.int8_weight; a backend
    without packed weights, e.g. Pallas on GPU)."""
    model = nnx.merge(graphdef, state)
    cpu = platform == "cpu"
    packer = _Packer(backend, packed_cache) if pack else None
    for path, module in nnx.iter_graph(model):
        if not isinstance(module, nnx.Module):
            continue
        for name, param in list(vars(module).items()):
            if isinstance(param, nnx.Param) and isinstance(param.get_value(), jax.Array):
                key = "/".join(map(str, (*path, name)))
                param.set_value(_stored(module, name, param.get_value(), packer, key, cpu))
            elif packer is not None and isinstance(param, nnx.Param) and isinstance(param.get_value(), Int8Weight) \
                    and param.get_value().q.ndim == 3:           # stacked int8 [L, K, N]: the int8 kernel's panels
                key = "/".join(map(str, (*path, name)))
                param.set_value(packer(param.get_value(), True, key))
            elif int8_kernel and isinstance(param, nnx.Param) and isinstance(param.get_value(), Int8Weight) \
                    and param.get_value().q.ndim == 3:
                param.set_value(backend.int8_weight(param.get_value()))
            elif native_blocks and isinstance(param, nnx.Param) and isinstance(param.get_value(), GGUFBlocks) \
                    and param.get_value().data.ndim == 3:
                param.set_value(backend.blocks(param.get_value()))
    if packed_cache is not None and pack:
        packed_cache.commit()
    return nnx.split(model)


class _Packer:
    """backend.pack through the packed cache, when there is one."""

    def __init__(self, backend, cache):
        self.backend, self.cache = backend, cache

    def __call__(self, x, stacked: bool, key: str):
        if self.cache is None:
            return self.backend.pack(x, stacked=stacked)
        hit = self.cache.get(key)
        if hit is not None:
            return self.backend.packed_from_stored(*hit)
        packed = self.backend.pack(x, stacked=stacked)
        self.cache.put(key, *self.backend.packed_to_stored(packed))
        return packed


def _stored(module, name: str, x: jax.Array, pack, key: str, cpu: bool):
    """The stored form of one param `name` of `module` (pack: a _Packer, None when not packing)."""
    if isinstance(module, Linear) and name == "kernel":
        if pack and (x.ndim == 3 or module.vocab):          # stacked [L, K, N], or the LM head [H, V]
            return pack(x, x.ndim == 3, key)
        if cpu and module.vocab and x.dtype == jnp.bfloat16:
            return x.astype(jnp.float32)
    if isinstance(module, Embed) and module.tied_head:
        if pack:
            return TiedEmbedding(table=_bits(x, cpu), head=pack(x.T, False, key + ".head"))
        if cpu and x.dtype == jnp.bfloat16:
            return x.astype(jnp.float32)
    return _bits(x, cpu)


def _bits(x: jax.Array, cpu: bool):
    if cpu and x.dtype == jnp.bfloat16:
        return BF16Bits(jax.lax.bitcast_convert_type(x, jnp.uint16))
    return x
