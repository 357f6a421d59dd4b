"""The Pallas int8-weight matmul (pallas_kernels/int8_matmul.py) in interpret mode on CPU, against
quantization.Int8Weight's jnp math, and wired through the Pallas backend (backends/pallas.PallasInt8).
Its CUDA lowering: tests/test_weight_kernels_gpu_lowering.py; compiled on a GPU: tests/test_kernels_gpu.py."""
from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jaxpaged import SamplingParams
from jaxpaged.quantization import Int8Weight, quantize_int8
from pallas_kernels.int8_matmul import int8_matmul, int8_matmul_reference, int8_tiling, pad_weight
from tests.engine_utils import make_llm


def _weight(rng, k, n, layers=None):
    shape = (k, n) if layers is None else (layers, k, n)
    return quantize_int8(rng.standard_normal(shape).astype(np.float32) * 0.05)


# K = 100 / 200 and N = 77 are not multiples of any block; M 1 / 5 / 64 take the decode tiles
# (BM 16 / 16 / 64), M 130 the long-step one (BM 64, BN 128)
@pytest.mark.parametrize("m,k,n", [(1, 100, 77), (5, 200, 77), (64, 100, 130), (130, 200, 77)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_interpret_equals_the_jnp_reference(m, k, n, dtype):
    rng = np.random.default_rng(m + k + n)
    w = _weight(rng, k, n)
    x = jnp.asarray(rng.standard_normal((m, k)), dtype)
    q, scale = jnp.asarray(w.q), jnp.asarray(w.scale)
    out = int8_matmul(x, q, scale, interpret=True)
    ref = int8_matmul_reference(x, q, scale)
    assert out.shape == (m, n) and out.dtype == jnp.float32
    # the reference is Int8Weight's own matmul
    np.testing.assert_array_equal(np.asarray(ref), np.asarray(Int8Weight(q, scale).matmul(x)))
    # products of bf16 / f32 values and int8 are exact in f32: only the summation order differs
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=0, atol=2e-6 * float(jnp.abs(ref).max()))


def test_stacked_weight_read_at_a_traced_layer_after_padding_once():
    """A stacked weight padded once (pad_weight: zero rows past K, zero-scale columns past N) and read
    at a traced layer equals that layer's reference; the padded rows add nothing."""
    rng = np.random.default_rng(7)
    w = _weight(rng, 90, 70, layers=3)
    q, scale = pad_weight(jnp.asarray(w.q), jnp.asarray(w.scale))
    assert q.shape == (3, 128, 128) and scale.shape == (3, 128) and not np.asarray(q[:, 90:]).any()
    x = jnp.asarray(rng.standard_normal((3, 90)), jnp.float32)
    run = jax.jit(lambda x, layer: int8_matmul(x, q, scale, layer, n=70, interpret=True))
    for layer in (0, 2):
        ref = int8_matmul_reference(x, jnp.asarray(w.q[layer]), jnp.asarray(w.scale[layer]))
        np.testing.assert_allclose(np.asarray(run(x, jnp.int32(layer))), np.asarray(ref),
                                   rtol=0, atol=2e-6 * float(jnp.abs(ref).max()))


def test_pallas_int8_weight_type():
    """backends.pallas.PallasInt8: padded once, logical shape kept, a layer's value = Int8Weight's."""
    from jaxpaged.backends.pallas import PallasInt8
    w = _weight(np.random.default_rng(3), 90, 70, layers=3)
    p = PallasInt8.of(Int8Weight(jnp.asarray(w.q), jnp.asarray(w.scale)))
    assert p.shape == (3, 90, 70) and p.q.shape == (3, 128, 128) and not p.sliced_by_scan
    assert p.nbytes() == 3 * 128 * 128 + 4 * 3 * 128
    np.testing.assert_array_equal(np.asarray(p.at_layer(jnp.int32(1)).value()), w.q[1].astype(np.float32) * w.scale[1])


def test_tiling_rules():
    # decode steps: BM the smallest power of two >= M (>= 16), BN 64; long steps BM 64, BN 128 where it divides
    blocks = lambda t: (t.block_m, t.block_n, t.block_k)
    assert blocks(int8_tiling(1, 576, 1536)) == (16, 64, 64)
    assert blocks(int8_tiling(33, 4096, 14336)) == (64, 64, 128)
    assert blocks(int8_tiling(512, 1536, 576)) == (64, 64, 128)
    assert blocks(int8_tiling(512, 576, 1536)) == (64, 128, 64)
    with pytest.raises(ValueError, match="int8_matmul: expected"):
        int8_matmul(jnp.zeros((2, 8)), jnp.zeros((4, 8), jnp.int8), jnp.ones((8,)), interpret=True)


def _int8_leaves(llm, kind):
    state = llm.llm_engine.runner.state
    return [x for x in jax.tree_util.tree_leaves(state, is_leaf=lambda v: isinstance(v, kind)) if isinstance(x, kind)]


def test_pallas_backend_runs_int8_weights_on_the_kernel(tiny_llama, tmp_path_factory, monkeypatch):
    """quantization="int8" on the Pallas backend with the kernel forced on (interpret mode on CPU):
    the 7 stacked int8 kernels become PallasInt8 and the greedy tokens equal the default engine's
    (native backend) int8 ones. Without forcing, the Pallas backend on CPU keeps XLA's dot."""
    from jaxpaged.backends.pallas import MATMUL_ENV, PallasInt8
    kw = dict(max_num_seqs=4, max_num_batched_tokens=32, max_model_len=64, quantization="int8")
    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    prompts = ["Hello there", "The quick brown fox jumps", "a b c d e f g"]
    tokens = lambda llm: [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
    want = tokens(make_llm(tiny_llama, tmp_path_factory, **kw))
    plain = make_llm(tiny_llama, tmp_path_factory, attention_backend="pallas", **kw)
    assert len(_int8_leaves(plain, Int8Weight)) == 7 and not _int8_leaves(plain, PallasInt8)
    del plain
    monkeypatch.setenv(MATMUL_ENV, "on")
    llm = make_llm(tiny_llama, tmp_path_factory, attention_backend="pallas", **kw)
    leaves = _int8_leaves(llm, PallasInt8)
    assert len(leaves) == 7 and not _int8_leaves(llm, Int8Weight)
    assert all(w.q.shape[1] % 64 == 0 and w.q.shape[2] % 64 == 0 for w in leaves)
    assert tokens(llm) == want
    monkeypatch.setenv(MATMUL_ENV, "sometimes")
    with pytest.raises(ValueError, match=MATMUL_ENV):
        make_llm(tiny_llama, tmp_path_factory, attention_backend="pallas", **kw)
