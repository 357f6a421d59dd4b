"""The one place jaxpaged changes process-wide JAX configuration: the persistent compilation cache.

JAX's persistent compilation cache lets a second start reuse compiled executables. It is a
process-wide setting (jax.config), so the engine's constructor does not touch it: the entry
points call `enable_compilation_cache(config)` before building an engine (LLM.__init__, the
server's main). Code that builds an LLMEngine itself calls it, or configures JAX its own way.

Every executable is written (`jax_persistent_cache_min_compile_time_secs` 0, min entry size 0):
XLA:CPU executables serialize (the native kernels' FFI custom calls included, looked up by name
when loaded), and on CPU most step shapes compile in well under JAX's default 1 s threshold, so
with it a warm start recompiled all of them. Reading one back costs milliseconds. `cache_stats()`
counts this process's hits and misses (tests and `bench startup` read it).
"""
from __future__ import annotations

import collections
import os
import threading

import jax

_EVENTS = {"/jax/compilation_cache/cache_hits": "hits", "/jax/compilation_cache/cache_misses": "misses"}
_stats: collections.Counter = collections.Counter()
_listening = threading.Lock()
_listener_on = False


def _on_event(name: str, **_kw) -> None:
    key = _EVENTS.get(name)
    if key is not None:
        _stats[key] += 1


def cache_stats() -> dict:
    """{"hits": n, "misses": m}: persistent-cache lookups of this process since the cache was enabled
    by `enable_compilation_cache` (a miss is a compile that was then written to the cache)."""
    return {"hits": _stats["hits"], "misses": _stats["misses"]}


def _listen() -> None:
    global _listener_on
    with _listening:
        if not _listener_on:
            jax.monitoring.register_event_listener(_on_event)
            _listener_on = True


def enable_compilation_cache(config) -> str | None:
    """Points JAX's persistent compilation cache at `config.compilation_cache_dir` (EngineConfig),
    by default `<cache>/xla` under the model cache. Returns the cache directory in use.

    A no-op when the process already has a cache directory (set by JAX_COMPILATION_CACHE_DIR,
    by the caller, or by an earlier engine) and the config names none, or names the same one.
    """
    _listen()
    wanted = config.compilation_cache_dir
    current = jax.config.jax_compilation_cache_dir
    if current and (wanted is None or os.path.abspath(wanted) == os.path.abspath(current)):
        return current
    if wanted is None:
        from jaxpaged.convert import cache_root
        wanted = os.path.join(cache_root(config.download_dir), "xla")
    os.makedirs(wanted, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", wanted)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return wanted
