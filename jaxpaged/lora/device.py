"""The adapter slots on the device: fixed-shape stacks per LoRA target, filled on demand (LRU).

    a[path]  [L, S, K, R]    b[path]  [L, S, R, N]      S = max_loras, R = max_lora_rank
    ranks[path]  [S] int32   each slot's adapter rank for the target (0: empty or not targeted)

The stacks are allocated once (zeros) and never change shape, so the step compiles once whatever
adapters come and go; loading an adapter into a slot is one jitted dynamic update with the slot as a
traced index (`_set_slot`, compiled once, the stacks donated); the ranks are a small host-built array
per target, replaced on load (the native kernel computes each slot at its own rank, skips rank 0).
Under tensor parallelism the stacks
split with their base kernel: a column-parallel kernel (split on N) has B split on N and A replicated,
a row-parallel one (split on K) has A split on K and B replicated (x @ A is then a partial sum, which
XLA all-reduces like the base matmul's).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxpaged.config import ModelConfig
from jaxpaged.lora.modules import lora_modules
from jaxpaged.lora.slots import SlotLRU


def stack_dtype(model_dtype: str, platform: str):
    """The slot stacks' dtype: the model's, except f32 on CPU (XLA:CPU's bf16 dots are slow; adapters are small)."""
    return jnp.float32 if model_dtype == "float32" or platform == "cpu" else jnp.bfloat16


def stack_bytes(model_config: ModelConfig, max_loras: int, max_lora_rank: int, dtype) -> int:
    """Device bytes of all slot stacks (the KV pool is sized after them)."""
    per_layer = sum(m.d_in + m.d_out for m in lora_modules(model_config).values())
    return model_config.num_layers * max_loras * max_lora_rank * per_layer * jnp.dtype(dtype).itemsize


def _set_slot(stacks: dict, index, adapter: dict) -> dict:
    """stacks {path: (a [L,S,K,R], b [L,S,R,N])} with stack index `index` set to adapter {path: (a [L,K,R], b [L,R,N])}."""
    out = {}
    for path, (a, b) in stacks.items():
        new_a, new_b = adapter[path]
        out[path] = (jax.lax.dynamic_update_slice_in_dim(a, new_a[:, None].astype(a.dtype), index, axis=1),
                     jax.lax.dynamic_update_slice_in_dim(b, new_b[:, None].astype(b.dtype), index, axis=1))
    return out


class LoRADeviceSlots:
    def __init__(self, model_config: ModelConfig, *, max_loras: int, max_lora_rank: int, dtype, mesh=None):
        """model_config: the config the device params follow (after any tensor-parallel layout change)."""
        self.modules = lora_modules(model_config)
        self.max_loras, self.rank, self.mesh = max_loras, max_lora_rank, mesh
        layers, s, r = model_config.num_layers, max_loras, max_lora_rank
        split = dict(model_config.family.TP_SPLIT_AXES)
        self._specs = {p: self._split_specs(split.get(p + "/kernel"), m.d_in, m.d_out)
                       for p, m in self.modules.items()}
        self.stacks = {}
        for p, m in self.modules.items():
            a_spec, b_spec = self._specs[p]
            self.stacks[p] = (self._zeros((layers, s, m.d_in, r), dtype, a_spec),
                              self._zeros((layers, s, r, m.d_out), dtype, b_spec))
        self._ranks = np.zeros((len(self.modules), s), np.int32)      # [targets, S] host copy
        self.ranks = self._device_ranks()
        self.lru = SlotLRU(max_loras)
        out_shardings = None
        if mesh is not None:
            out_shardings = {p: (NamedSharding(mesh, a), NamedSharding(mesh, b)) for p, (a, b) in self._specs.items()}
        # a fresh partial: jit caches are per callable, so num_compiled() counts this instance's own
        self._set = jax.jit(functools.partial(_set_slot), donate_argnums=(0,), out_shardings=out_shardings)

    def _split_specs(self, axis, d_in: int, d_out: int) -> tuple[P, P]:
        """(a spec [L, S, K, R], b spec [L, S, R, N]) following the base kernel's split axis."""
        n = 1 if self.mesh is None else self.mesh.size
        if axis == -1 and d_out % n == 0:
            return P(), P(None, None, None, "tp")
        if axis == -2 and d_in % n == 0:
            return P(None, None, "tp", None), P()
        return P(), P()

    def _zeros(self, shape, dtype, spec: P):
        if self.mesh is None:
            return jnp.zeros(shape, dtype)
        return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=NamedSharding(self.mesh, spec))()

    @property
    def nbytes_per_slot(self) -> int:
        """Device bytes one adapter slot takes (all targets, padded to max_lora_rank)."""
        return sum(a.nbytes + b.nbytes for a, b in self.stacks.values()) // self.max_loras

    def _device_ranks(self) -> dict:
        """{path: ranks [S] int32} on the device (replicated under a mesh)."""
        out = {}
        for i, p in enumerate(self.modules):
            host = self._ranks[i].copy()
            out[p] = (jnp.asarray(host) if self.mesh is None
                      else jax.device_put(host, NamedSharding(self.mesh, P())))
        return out

    def step_args(self) -> dict:
        """The step's LoRA argument: {path: (a, b, ranks)} (lora/weight.attach_lora)."""
        return {p: (a, b, self.ranks[p]) for p, (a, b) in self.stacks.items()}

    def num_compiled(self) -> int:
        return self._set._cache_size()

    def slots_for(self, scheduled) -> list[int]:
        """Slot of each scheduled sequence's adapter (0: none), loading adapters not resident."""
        wanted = {}
        for s in scheduled:
            lora = s.seq.lora
            if lora is not None:
                wanted[lora.key] = lora
        slot_of = {}
        for key, lora in wanted.items():
            slot, load = self.lru.acquire(key, set(wanted))
            if load:
                self._load(slot, lora.arrays)
            slot_of[key] = slot
        return [slot_of[s.seq.lora.key] if s.seq.lora is not None else 0 for s in scheduled]

    def warmup(self) -> None:
        """Compiles the slot fill (with zeros into slot 1, which holds nothing yet)."""
        if self.lru.resident():
            return
        zeros = {p: (np.zeros((a.shape[0],) + a.shape[2:], a.dtype), np.zeros((b.shape[0],) + b.shape[2:], b.dtype))
                 for p, (a, b) in self.stacks.items()}
        self._load(1, zeros)

    def _load(self, slot: int, host_arrays: dict) -> None:
        """host_arrays {path: (a [L, K, R], b [L, R, N])} into slot `slot` of every stack."""
        arrays = host_arrays
        if self.mesh is not None:
            from jaxpaged.sharding import _put_global
            arrays = {}
            for p, (a, b) in host_arrays.items():
                a_spec, b_spec = self._specs[p]
                arrays[p] = (_put_global(a, NamedSharding(self.mesh, _without(a_spec, 1))),   # [L, K, R]
                             _put_global(b, NamedSharding(self.mesh, _without(b_spec, 1))))   # [L, R, N]
        self.stacks = self._set(self.stacks, jnp.int32(slot - 1), arrays)
        for i, p in enumerate(self.modules):
            self._ranks[i, slot - 1] = _used_rank(*host_arrays[p])
        self.ranks = self._device_ranks()

    def release(self, key: int) -> None:
        self.lru.release(key)


def _used_rank(a: np.ndarray, b: np.ndarray) -> int:
    """a [L, K, R], b [L, R, N] (zero-padded from the adapter's rank to R) -> 1 + the last rank
    column nonzero in any layer (0: the adapter does not target this module)."""
    used = np.flatnonzero(np.any(a != 0, axis=(0, 1)) | np.any(b != 0, axis=(0, 2)))
    return int(used[-1]) + 1 if used.size else 0


def _without(spec: P, axis: int) -> P:
    """A stack's spec without its slot axis (the spec of one adapter's array)."""
    return P(*[x for i, x in enumerate(spec) if i != axis])
