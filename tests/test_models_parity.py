"""Numerics against Hugging Face transformers (torch, CPU, f32) on tiny random-weight models.

The JAX model runs one prefill over the paged KV cache (permuted, non-contiguous block table) and
its logits at every position must match transformers' within 1e-4 (relative to the largest logit).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from jaxpaged.convert import load_model
from jaxpaged.models import build_state
from jaxpaged.attention import AttentionMetadata, AttentionOptions
from tests import tiny_models

KINDS = ["llama", "llama3", "llama_tied", "llama_hd128", "mistral", "qwen2", "qwen3", "gpt2"]


@functools.lru_cache(maxsize=None)
def _loaded(path: str):
    m = load_model(path, dtype="float32", progress=False, cache_dir=path + "-cache")
    graphdef, state = build_state(m.config, m.params)
    return m.config, graphdef, state


def paged_prefill_logits(path: str, ids: np.ndarray, block_size: int, backend: str) -> np.ndarray:
    """Logits [L, V] of one prompt computed through the paged cache."""
    cfg, graphdef, state = _loaded(path)
    n = len(ids)
    num_pages = -(-n // block_size)
    total = num_pages + 3
    shape = (cfg.num_layers, cfg.num_kv_heads, total, block_size, cfg.head_dim)
    kv = (jnp.zeros(shape), jnp.zeros(shape))
    table = np.random.default_rng(n).permutation(np.arange(1, total))[:num_pages].astype(np.int32)
    pos = np.arange(n, dtype=np.int32)
    meta = AttentionMetadata(jnp.asarray(table[pos // block_size] * block_size + pos % block_size),
                             jnp.asarray(table[None]), jnp.asarray([n], jnp.int32),
                             jnp.asarray([0, n], jnp.int32))
    opts = AttentionOptions(sm_scale=cfg.head_dim ** -0.5, backend=backend)

    @jax.jit
    def run(state, kv, ids, pos, meta):
        model = nnx.merge(graphdef, state)
        hidden, _ = model.forward(ids, pos, kv, meta, opts)
        return model.logits(hidden)

    return np.asarray(run(state, kv, jnp.asarray(ids, jnp.int32), jnp.asarray(pos), meta))


def hf_logits(kind: str, ids: np.ndarray) -> np.ndarray:
    model = _hf(kind)
    with torch.no_grad():
        return model(torch.tensor(np.asarray(ids, np.int64)[None])).logits[0].numpy()


@functools.lru_cache(maxsize=None)
def _hf(kind):
    return tiny_models.make_hf_model(kind)


def _rel_err(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_transformers(kind, tiny_model_factory):
    path = tiny_model_factory(kind)
    rng = np.random.default_rng(0)
    for n in (1, 17, 333):   # 333 > 300 exercises RoPE far from the origin (and llama3 scaling)
        ids = rng.integers(3, 320, n)
        ours = paged_prefill_logits(path, ids, block_size=16, backend="jnp")
        assert _rel_err(ours, hf_logits(kind, ids)) < 1e-4, (kind, n)


@pytest.mark.parametrize("backend", ["pallas", "native"])
@pytest.mark.parametrize("block_size", [8, 16, 32])
def test_kernel_paged_path_matches_transformers(block_size, backend, tiny_model_factory):
    kind = "llama"
    path = tiny_model_factory(kind)
    ids = np.random.default_rng(1).integers(3, 320, 45)   # 45: crosses page boundaries for every size
    ours = paged_prefill_logits(path, ids, block_size=block_size, backend=backend)
    assert _rel_err(ours, hf_logits(kind, ids)) < 1e-4


@pytest.mark.parametrize("backend", ["pallas", "native"])
def test_kernels_gpt2_and_qwen3_match_transformers(backend, tiny_model_factory):
    for kind in ("gpt2", "qwen3"):
        ids = np.random.default_rng(2).integers(3, 320, 40)
        ours = paged_prefill_logits(tiny_model_factory(kind), ids, block_size=16, backend=backend)
        assert _rel_err(ours, hf_logits(kind, ids)) < 1e-4, kind
