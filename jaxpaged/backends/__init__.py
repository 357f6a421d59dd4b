"""Kernel backends: the one place that decides which attention and matmul kernels run and how the
params and the KV cache are stored for them.

  native   C++ kernels for XLA:CPU (cpu_kernels/): attention, and weight matmuls on packed weights
  pallas   the Pallas kernels (pallas_kernels/): compiled for GPU/TPU, interpret mode on CPU
  jnp      the pure-jnp references of those kernels

`resolve_backend(requested)` picks a name without side effects (nothing is compiled: the native
kernels are built at their first use, when the runner asks `backend.ready()`); `get_backend(name)`
returns the backend object; `kv_cache_dtype(config)` is the KV cache's dtype the pool is sized by.
"""
from __future__ import annotations

import functools

import jax

from jaxpaged.backends.base import Backend
from jaxpaged.backends.kv_storage import kv_bytes_per_block

BACKENDS = ("native", "pallas", "jnp")

__all__ = ["BACKENDS", "Backend", "get_backend", "kv_bytes_per_block", "kv_cache_dtype", "resolve_backend"]


def resolve_backend(requested: str, platform: str | None = None) -> str:
    """EngineConfig.attention_backend -> a backend name. "auto": native on CPU where a C++ compiler
    is present (the kernels are built at first use), Pallas elsewhere. No side effects."""
    platform = platform or jax.default_backend()
    if requested == "native" and platform != "cpu":
        raise ValueError(f"attention_backend: 'native' runs on CPU only, the backend is {platform}")
    if requested != "auto":
        if requested not in BACKENDS:
            raise ValueError(f"attention_backend: expected one of {['auto', *BACKENDS]}, got {requested!r}")
        return requested
    if platform == "cpu":
        from cpu_kernels.build import compiler_available
        if compiler_available():
            return "native"
    return "pallas"


@functools.cache
def get_backend(name: str) -> Backend:
    if name == "native":
        from jaxpaged.backends.native import NativeBackend
        return NativeBackend()
    if name == "pallas":
        from jaxpaged.backends.pallas import PallasBackend
        return PallasBackend()
    if name == "jnp":
        from jaxpaged.backends.reference import ReferenceBackend
        return ReferenceBackend()
    raise ValueError(f"attention backend: expected one of {list(BACKENDS)}, got {name!r}")


def kv_cache_dtype(config, platform: str | None = None) -> str:
    """The KV cache's dtype name: explicit, or "auto" = what the resolved backend prefers for the
    model's dtype on this platform. No side effects (used to size the KV pool)."""
    if config.kv_cache_dtype != "auto":
        return config.kv_cache_dtype
    platform = platform or jax.default_backend()
    backend = get_backend(resolve_backend(config.attention_backend, platform))
    return backend.default_kv_dtype(config.dtype, platform)
