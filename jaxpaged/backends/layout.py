"""How a model's params are stored for a backend, decided once at load (`lay_out_params`).

Rules, by the layer type that owns the param (models/layers.py):
  - a backend with its own matmul (`backend.packs_weights`) gets every stacked Linear kernel and the
    LM head packed (`backend.pack`); a tied embedding keeps its table for the lookup and gains the
    packed head beside it (weights.TiedEmbedding);
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

from jaxpaged.models.layers import Embed, Linear
from jaxpaged.weights import BF16Bits, TiedEmbedding


def lay_out_params(graphdef, state, backend, *, platform: str, pack: bool):
    """(graphdef, State) -> (graphdef, State) with every param in the backend's storage form.
    pack: Linear kernels and the LM head go to the backend's packed form (backend.pack). Params
    that arrive as a weight type already (quantized by the converter) are kept as they are."""
    model = nnx.merge(graphdef, state)
    cpu = platform == "cpu"
    for _, module in nnx.iter_graph(model):
        if not isinstance(module, nnx.Module):
            continue
        for name, param in list(vars(module).items()):
            if isinstance(param, nnx.Param) and isinstance(param.get_value(), jax.Array):
                param.set_value(_stored(module, name, param.get_value(), backend, pack, cpu))
    return nnx.split(model)


def _stored(module, name: str, x: jax.Array, backend, pack: bool, cpu: bool):
    """The stored form of one param `name` of `module`."""
    if isinstance(module, Linear) and name == "kernel":
        if pack and (x.ndim == 3 or module.vocab):          # stacked [L, K, N], or the LM head [H, V]
            return backend.pack(x, stacked=x.ndim == 3)
        if cpu and module.vocab and x.dtype == jnp.bfloat16:
            return x.astype(jnp.float32)
    if isinstance(module, Embed) and module.tied_head:
        if pack:
            return TiedEmbedding(table=_bits(x, cpu), head=backend.pack(x.T, stacked=False))
        if cpu and x.dtype == jnp.bfloat16:
            return x.astype(jnp.float32)
    return _bits(x, cpu)


def _bits(x: jax.Array, cpu: bool):
    if cpu and x.dtype == jnp.bfloat16:
        return BF16Bits(jax.lax.bitcast_convert_type(x, jnp.uint16))
    return x
