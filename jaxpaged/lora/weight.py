"""LoRA as a weight type: a Linear's kernel that also adds its rows' adapter deltas.

Inside the jitted step (runner._forward_impl) every LoRA target's stacked kernel is wrapped,
`attach_lora(model, stacks, lora_slots)`, in a LoRAWeight holding the base weight (any stored form:
dense, BF16Bits, Packed, int8), the adapter slot stacks and the flat batch's per-row slot indices.
The layer scan hands it over whole (`sliced_by_scan = False`) and `at_layer` slices one layer; its
`matmul` is the base weight's own matmul plus

    delta[t] = (x[t] @ A[slot[t]]) @ B[slot[t]]         (the scale is folded into B at load)

computed for all rows at once as two dense matmuls over the slots: x [T, K] @ A [K, S*R] -> [T, S, R],
each row keeps only its own slot's R columns (slot 0: none, a base row), then [T, S*R] @ B [S*R, N].
A step with no adapter row skips both (lax.cond), so LoRA enabled but unused costs ~nothing.
Model code is unchanged: it calls the Linear, which calls the weight's matmul.

Shapes (S = max_loras; slot s in 1..S is stack index s - 1):
    a      [L, K, S, R]   (per layer [K, S, R]: reshapes to [K, S*R] without a copy)
    b      [L, S, R, N]   (per layer [S*R, N])
    slots  [T] int32      0 = no adapter
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from jaxpaged.weights import Weight, matmul


def lora_delta(x: jax.Array, a: jax.Array, b: jax.Array, slots: jax.Array) -> jax.Array:
    """x [T, K], a [K, S, R], b [S, R, N], slots [T] -> [T, N] f32: each row's own adapter's delta."""
    t = x.shape[0]
    k, s, r = a.shape
    xa = jnp.dot(x.astype(a.dtype), a.reshape(k, s * r), preferred_element_type=jnp.float32)   # [T, S*R]
    own = slots[:, None] == jnp.arange(1, s + 1, dtype=slots.dtype)[None, :]                   # [T, S]
    xa = jnp.where(own[:, :, None], xa.reshape(t, s, r), 0.0).reshape(t, s * r)
    return jnp.dot(xa.astype(b.dtype), b.reshape(s * r, -1), preferred_element_type=jnp.float32)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class LoRALayerWeight(Weight):
    """One layer's kernel with its adapter slots (what LoRAWeight.at_layer gives the layer body)."""
    base: object             # array or Weight [K, N]
    a: jax.Array             # [K, S, R]
    b: jax.Array             # [S, R, N]
    slots: jax.Array         # [T] int32

    def matmul(self, x: jax.Array, rows=None) -> jax.Array:
        y = matmul(x, self.base, rows)
        # a step of base rows only (slot 0 everywhere) skips the adapter matmuls
        return jax.lax.cond(jnp.any(self.slots > 0), lambda: y + lora_delta(x, self.a, self.b, self.slots),
                            lambda: y)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class LoRAWeight(Weight):
    """A stacked Linear kernel [L, K, N] with its adapter slot stacks (see the module docstring)."""
    base: object             # array or Weight [L, K, N]
    a: jax.Array             # [L, K, S, R]
    b: jax.Array             # [L, S, R, N]
    slots: jax.Array         # [T] int32
    sliced_by_scan = False   # a and b are sliced here; slots are per row, not per layer

    def at_layer(self, layer, rows=None) -> LoRALayerWeight:
        base = self.base
        if isinstance(base, Weight) and not base.sliced_by_scan:
            base = base.at_layer(layer, rows)
        else:
            base = jax.tree_util.tree_map(lambda x: x[layer], base)
        return LoRALayerWeight(base, self.a[layer], self.b[layer], self.slots)


def attach_lora(model, stacks: dict, slots: jax.Array):
    """Wraps each LoRA target's kernel (stacks: {module path "layers/q_proj": (a, b)}) of a merged
    model in a LoRAWeight reading `slots` [T]. Traced inside the step; the model object is the step's own."""
    for path, (a, b) in stacks.items():
        module = model
        for part in path.split("/"):
            module = getattr(module, part)
        module.kernel.set_value(LoRAWeight(module.kernel.get_value(), a, b, slots))
    return model
