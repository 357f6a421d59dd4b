"""The one place jaxpaged changes process-wide JAX configuration: the persistent compilation cache.

JAX's persistent compilation cache lets a second start reuse compiled executables. It is a
process-wide setting (jax.config), so the engine's constructor does not touch it: the entry
points call `enable_compilation_cache(config)` before building an engine (LLM.__init__, the
server's main). Code that builds an LLMEngine itself calls it, or configures JAX its own way.
"""
from __future__ import annotations

import os

import jax


def enable_compilation_cache(config) -> str | None:
    """Points JAX's persistent compilation cache at `config.compilation_cache_dir` (EngineConfig),
    by default `<cache>/xla` under the model cache. Returns the cache directory in use.

    A no-op when the process already has a cache directory (set by JAX_COMPILATION_CACHE_DIR,
    by the caller, or by an earlier engine) and the config names none, or names the same one.
    """
    wanted = config.compilation_cache_dir
    current = jax.config.jax_compilation_cache_dir
    if current and (wanted is None or os.path.abspath(wanted) == os.path.abspath(current)):
        return current
    if wanted is None:
        from jaxpaged.convert import cache_root
        wanted = os.path.join(cache_root(config.download_dir), "xla")
    os.makedirs(wanted, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", wanted)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return wanted
