"""Weights as values that know how they multiply: the one interface model code uses for params.

A parameter's value is either a plain array (dense, in the model's dtype) or a `Weight`: a pytree
type a backend chose at load time for how the weight is stored (bf16 bit patterns, a kernel's
packed layout, later int8 or GGUF blocks). Model code never asks which: it calls

  value(w)             the dense array (norm scales, biases, position tables)
  matmul(x, w)         x [M, K] @ w [K, N] -> [M, N] f32
  take(w, ids)         rows of an embedding table [N, H] -> [len(ids), H]
  matmul_t(x, w)       x [M, H] @ w.T for a tied embedding table w [V, H] -> [M, V] f32

`rows` (optional, int32 scalar) says how many leading rows of x are real (the rest are bucket
padding); a weight may skip the rest (their output rows are then 0) or ignore it.

Stacked weights ([L, ...], one slice per decoder layer) are sliced by the layer scan like any
array, except a Weight with `sliced_by_scan = False`: its kernel reads one layer of the whole
stacked array in place (a slice handed to a custom call is a copy), so the scan hands it over
whole with `at_layer(index, rows)` (models/layers.scan_layers).
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp


class Weight:
    """Base of the stored-weight pytree types. Subclasses override what they support."""
    sliced_by_scan = True

    def value(self) -> jax.Array:
        raise NotImplementedError(f"{type(self).__name__} has no dense value")

    def matmul(self, x: jax.Array, rows=None) -> jax.Array:
        w = self.value()
        return jnp.dot(x.astype(w.dtype), w, preferred_element_type=jnp.float32)

    def take(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.value(), ids, axis=0)

    def matmul_t(self, x: jax.Array, rows=None) -> jax.Array:
        table = self.value()
        return jnp.dot(x.astype(table.dtype), table.T, preferred_element_type=jnp.float32)

    def at_layer(self, layer, rows=None) -> "Weight":
        raise NotImplementedError(f"{type(self).__name__} is sliced by the layer scan")

    def field_split_axes(self, axis: int | None) -> dict:
        """Tensor parallelism: {field name: axis split over "tp" or None} for a weight whose dense
        form splits on `axis` (None: replicated). Default: every field replicated."""
        return {}


def value(w) -> jax.Array:
    return w.value() if isinstance(w, Weight) else w


def matmul(x: jax.Array, w, rows=None) -> jax.Array:
    """x [M, K] @ w [K, N] -> [M, N] f32 (a dense w is used in its own dtype, x cast to it)."""
    if isinstance(w, Weight):
        return w.matmul(x, rows)
    return jnp.dot(x.astype(w.dtype), w, preferred_element_type=jnp.float32)


def take(w, ids: jax.Array) -> jax.Array:
    """Rows `ids` [T] of an embedding table [N, H] -> [T, H] (in the table's stored dtype)."""
    return w.take(ids) if isinstance(w, Weight) else jnp.take(w, ids, axis=0)


def matmul_t(x: jax.Array, w, rows=None) -> jax.Array:
    """A tied LM head: x [M, H] @ table.T -> [M, V] f32 (x cast to the table's dtype)."""
    if isinstance(w, Weight):
        return w.matmul_t(x, rows)
    return jnp.dot(x.astype(w.dtype), w.T, preferred_element_type=jnp.float32)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class BF16Bits(Weight):
    """A bf16 array held as its uint16 bit patterns (XLA:CPU: a bf16 array sliced inside the layer
    scan is widened whole on every call; raw bits are sliced as they are). Bit-cast back at use."""
    bits: jax.Array          # [...] uint16

    def value(self) -> jax.Array:
        return jax.lax.bitcast_convert_type(self.bits, jnp.bfloat16)

    def take(self, ids: jax.Array) -> jax.Array:
        return jax.lax.bitcast_convert_type(jnp.take(self.bits, ids, axis=0), jnp.bfloat16)

    @property
    def shape(self):
        return self.bits.shape


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class TiedEmbedding(Weight):
    """An embedding table that is also the LM head, stored twice in the forms each use wants:
    `table` [V, H] for the token lookup, `head` a weight [H, V] for the logits (e.g. packed)."""
    table: object            # array or Weight [V, H]
    head: object             # array or Weight [H, V]

    def value(self) -> jax.Array:
        return value(self.table)

    def take(self, ids: jax.Array) -> jax.Array:
        return take(self.table, ids)

    def matmul_t(self, x: jax.Array, rows=None) -> jax.Array:
        return matmul(x, self.head, rows)
