"""LoRA as a weight type: a Linear's kernel that also adds its rows' adapter deltas.

Inside the jitted step (runner._forward_impl) every LoRA target's stacked kernel is wrapped,
`attach_lora(model, lora, lora_slots, backend)`, in a LoRAWeight holding the base weight (any stored
form: dense, BF16Bits, Packed, int8), the adapter slot stacks, each slot's rank for the target and
the flat batch's per-row slot indices. The layer scan hands it over whole (`sliced_by_scan = False`)
and `at_layer` picks one layer; its `matmul` is the base weight's own matmul plus

    delta[t] = (x[t] @ A[slot[t]][:, :r]) @ B[slot[t]][:r]    r = the slot's rank (the scale is folded into B)

through the backend boundary (`Backend.lora_matmul`): the native CPU backend's kernel groups the rows
by slot and computes only the slots in use at their own ranks, reading the stacks in place
(cpu_kernels/lora_matmul.cc); the reference below (GPU/TPU, tensor parallelism) is two dense matmuls
over all slots at max_lora_rank, masked per row, skipped (lax.cond) in a step with no adapter row.
Model code is unchanged: it calls the Linear, which calls the weight's matmul.

Shapes (S = max_loras, R = max_lora_rank; slot s in 1..S is stack index s - 1):
    a      [L, S, K, R]   (slot-major: one slot's A of one layer is contiguous)
    b      [L, S, R, N]
    ranks  [S] int32      the slot's adapter rank for this target (0: empty, or a target it lacks)
    slots  [T] int32      0 = no adapter
"""
from __future__ import annotations

from dataclasses import dataclass, field

import jax
import jax.numpy as jnp

from jaxpaged.weights import Weight, matmul


def lora_delta(x: jax.Array, a: jax.Array, b: jax.Array, slots: jax.Array) -> jax.Array:
    """x [T, K], a [S, K, R], b [S, R, N], slots [T] -> [T, N] f32: each row's own adapter's delta
    (every slot computed at R, the other slots' products masked out; slot 0 rows get 0)."""
    s = a.shape[0]
    xa = jnp.einsum("tk,skr->tsr", x.astype(a.dtype), a, preferred_element_type=jnp.float32)   # [T, S, R]
    own = slots[:, None] == jnp.arange(1, s + 1, dtype=slots.dtype)[None, :]                  # [T, S]
    xa = jnp.where(own[:, :, None], xa, 0.0)
    return jnp.einsum("tsr,srn->tn", xa.astype(b.dtype), b, preferred_element_type=jnp.float32)


def lora_matmul_reference(y, x, a, b, ranks, slots, layer, rows=None):
    """y [T, N] + each row's delta for `layer` of the stacks (a [L, S, K, R], b [L, S, R, N]);
    a step of base rows only (slot 0 everywhere) skips the adapter matmuls. `ranks`, `rows`: unused
    (zero padding past a slot's rank and slot-0 padding rows add nothing)."""
    del ranks, rows
    a_l = jax.lax.dynamic_index_in_dim(a, layer, 0, keepdims=False)    # [S, K, R]
    b_l = jax.lax.dynamic_index_in_dim(b, layer, 0, keepdims=False)    # [S, R, N]
    return jax.lax.cond(jnp.any(slots > 0), lambda: y + lora_delta(x, a_l, b_l, slots), lambda: y)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class LoRALayerWeight(Weight):
    """One layer's kernel with its adapter slots (what LoRAWeight.at_layer gives the layer body)."""
    base: object             # array or Weight [K, N]
    a: jax.Array             # [L, S, K, R] (all layers: the backend reads `layer` of it)
    b: jax.Array             # [L, S, R, N]
    ranks: jax.Array         # [S] int32
    slots: jax.Array         # [T] int32
    layer: jax.Array         # int32 scalar
    backend: object = field(metadata=dict(static=True))   # jaxpaged.backends.Backend (its lora_matmul)

    def matmul(self, x: jax.Array, rows=None) -> jax.Array:
        y = matmul(x, self.base, rows)
        return self.backend.lora_matmul(y, x, self.a, self.b, self.ranks, self.slots, self.layer, rows)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class LoRAWeight(Weight):
    """A stacked Linear kernel [L, K, N] with its adapter slot stacks (see the module docstring)."""
    base: object             # array or Weight [L, K, N]
    a: jax.Array             # [L, S, K, R]
    b: jax.Array             # [L, S, R, N]
    ranks: jax.Array         # [S] int32
    slots: jax.Array         # [T] int32
    backend: object = field(metadata=dict(static=True))
    sliced_by_scan = False   # a and b are read at the layer; slots are per row, not per layer

    def at_layer(self, layer, rows=None) -> LoRALayerWeight:
        base = self.base
        if isinstance(base, Weight) and not base.sliced_by_scan:
            base = base.at_layer(layer, rows)
        else:
            base = jax.tree_util.tree_map(lambda x: x[layer], base)
        return LoRALayerWeight(base, self.a, self.b, self.ranks, self.slots, jnp.asarray(layer, jnp.int32),
                               self.backend)


def attach_lora(model, lora: dict, slots: jax.Array, backend):
    """Wraps each LoRA target's kernel (lora: {module path "layers/q_proj": (a, b, ranks)}) of a merged
    model in a LoRAWeight reading `slots` [T], its deltas through `backend.lora_matmul`. Traced inside
    the step; the model object is the step's own."""
    for path, (a, b, ranks) in lora.items():
        module = model
        for part in path.split("/"):
            module = getattr(module, part)
        module.kernel.set_value(LoRAWeight(module.kernel.get_value(), a, b, ranks, slots, backend))
    return model
