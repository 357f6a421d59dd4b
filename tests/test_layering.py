"""Layering rules: the host-side scheduling code imports no jax; process-wide JAX config is set in one place."""
from __future__ import annotations

import subprocess
import sys

import jax

from jaxpaged.compilation_cache import enable_compilation_cache
from jaxpaged.engine_config import EngineConfig

_BLOCK_JAX = """
import sys

class _NoJax:
    def find_spec(self, name, path=None, target=None):
        if name == "jax" or name.startswith(("jax.", "jaxlib")):
            raise ImportError(f"{name} imported by host-side scheduling code")
        return None

sys.meta_path.insert(0, _NoJax())
import jaxpaged.scheduler, jaxpaged.block_manager, jaxpaged.sequence
s = jaxpaged.scheduler.Scheduler(num_blocks=8, block_size=4, max_num_seqs=2, max_num_batched_tokens=16,
                                 max_model_len=32)
s.add_sequence(jaxpaged.sequence.Sequence("a", [1, 2, 3]))
out = s.schedule()
assert out.scheduled[0].num_new_tokens == 3 and out.scheduled[0].sample
assert not any(m == "jax" or m.startswith(("jax.", "jaxlib")) for m in sys.modules)
print("ok")
"""


def test_scheduler_and_block_manager_import_no_jax():
    r = subprocess.run([sys.executable, "-c", _BLOCK_JAX], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_compilation_cache_keeps_a_directory_already_set(tmp_path):
    before = jax.config.jax_compilation_cache_dir
    try:
        mine = str(tmp_path / "mine")
        jax.config.update("jax_compilation_cache_dir", mine)
        # a config naming no directory leaves the process's choice alone
        assert enable_compilation_cache(EngineConfig(download_dir=str(tmp_path / "dl"))) == mine
        assert jax.config.jax_compilation_cache_dir == mine
        # a config naming one sets it (and creates it)
        other = str(tmp_path / "other")
        assert enable_compilation_cache(EngineConfig(compilation_cache_dir=other)) == other
        assert jax.config.jax_compilation_cache_dir == other and (tmp_path / "other").is_dir()
    finally:
        jax.config.update("jax_compilation_cache_dir", before)


def test_engine_constructor_leaves_jax_config_alone(tiny_llama, tmp_path_factory):
    from jaxpaged.engine import LLMEngine
    before = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
    engine = LLMEngine(EngineConfig(model=tiny_llama, enforce_eager=True, max_model_len=64, num_kv_blocks=8,
                                    download_dir=str(tmp_path_factory.getbasetemp() / "jp-cache")), progress=False)
    assert engine.max_model_len == 64
    assert (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs) == before
