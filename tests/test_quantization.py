"""Weight-only int8 (EngineConfig.quantization="int8"): the stored form, its multiply, the engine
end to end, and bad input."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpaged import SamplingParams
from jaxpaged.engine_config import EngineConfig
from jaxpaged.quantization import Int8Weight, quantize_int8
from tests.engine_utils import make_llm


def test_int8_round_trip_is_within_half_a_step_per_channel():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((2, 64, 24)).astype(np.float32) * rng.uniform(0.01, 3, (1, 1, 24))
    w[1, :, 5] = 0.0                                   # an all-zero output channel
    qw = quantize_int8(jnp.asarray(w))
    assert qw.q.dtype == jnp.int8 and qw.q.shape == w.shape and qw.scale.shape == (2, 24)
    scale = np.asarray(qw.scale)
    err = np.abs(np.asarray(qw.value()) - w)
    assert (err <= scale[:, None, :] / 2 + 1e-7).all()
    # each channel's largest |w| is exact (it maps to +-127)
    np.testing.assert_allclose(np.abs(np.asarray(qw.value())).max(axis=1), np.abs(w).max(axis=1), rtol=1e-6)
    assert not np.asarray(qw.q)[1, :, 5].any()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_int8_matmul_equals_x_times_dequantized(dtype):
    rng = np.random.default_rng(1)
    qw = quantize_int8(jnp.asarray(rng.standard_normal((48, 40)), jnp.float32))
    x = jnp.asarray(rng.standard_normal((5, 48)), dtype)
    y = np.asarray(qw.matmul(x))
    ref = np.asarray(x, np.float32) @ np.asarray(qw.value())
    np.testing.assert_allclose(y, ref, rtol=1e-2 if dtype == jnp.bfloat16 else 1e-5, atol=1e-3)


def test_unknown_scheme_is_a_value_error_naming_the_field():
    with pytest.raises(ValueError, match="quantization: expected one of"):
        EngineConfig(quantization="int4")
    assert EngineConfig(quantization="none").quantization is None


def _int8_leaves(state):
    """The int8 weights: Int8Weight, or on the native backend the int8 kernel's packed form."""
    from jaxpaged.backends.native import PackedInt8
    is_q = lambda x: isinstance(x, (Int8Weight, PackedInt8))
    return [x for x in jax.tree_util.tree_leaves(state, is_leaf=is_q) if is_q(x)]


def test_engine_int8_weights_end_to_end(tiny_llama, tmp_path_factory):
    prompts = [[5, 17, 99, 3, 250, 41, 7], [300, 2, 2, 2, 61]]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, prompt_logprobs=1)
    # the dense Linear kernels as converted (not packed for the native matmuls): the bytes compared
    dense = make_llm(tiny_llama, tmp_path_factory, max_num_batched_tokens=64, max_model_len=128,
                     native_matmul=False)
    int8 = make_llm(tiny_llama, tmp_path_factory, max_num_batched_tokens=64, max_model_len=128,
                    quantization="int8")
    runner = int8.llm_engine.runner
    q = _int8_leaves(runner.state)
    assert len(q) == 7                                       # q, k, v, o, gate, up, down (stacked)
    dense_leaves = {id(x): x for x in jax.tree_util.tree_leaves(dense.llm_engine.runner.state)}
    linear_f32 = sum(x.nbytes for x in dense_leaves.values() if x.ndim == 3)
    assert sum(w.nbytes() for w in q) <= 0.3 * linear_f32       # the memory bar
    out_d = dense.generate(prompts, params, use_tqdm=False)
    out_q = int8.generate(prompts, params, use_tqdm=False)
    for prompt, a, b in zip(prompts, out_d, out_q):
        assert len(b.outputs[0].token_ids) == 8 and b.outputs[0].finish_reason == "length"
        # the prompt tokens' log-probs under int8 weights stay close to the dense model's
        lp = lambda o: np.array([o.prompt_logprobs[i][t].logprob for i, t in enumerate(prompt) if i > 0])
        assert np.abs(lp(a) - lp(b)).max() < 0.05
    assert int8.llm_engine.scheduler.stats().kv_cache_usage == 0.0


def test_int8_tensor_parallel_equals_one_device(tmp_path, tiny_model_factory):
    from tests.test_tensor_parallel import run_worker
    path = tiny_model_factory("llama", num_key_value_heads=4)
    params = ["layers/q_proj/kernel/q", "layers/q_proj/kernel/scale", "layers/o_proj/kernel/q",
              "layers/o_proj/kernel/scale"]
    out = run_worker(tmp_path, "int8", devices=2, model=path, tps=[1, 2], params=params, quantization="int8")
    assert out["tokens"]["2"] == out["tokens"]["1"]
    s = out["shards"]["2"]
    # the int8 values and their scales split with the weight: column-parallel q_proj by output
    # channel (scales too), row-parallel o_proj by input rows (its per-output scales whole)
    assert s["layers/q_proj/kernel/q"] == [[2, 64, 32]] * 2 and s["layers/q_proj/kernel/scale"] == [[2, 32]] * 2
    assert s["layers/o_proj/kernel/q"] == [[2, 32, 64]] * 2 and s["layers/o_proj/kernel/scale"] == [[2, 64]] * 2


# ---- quantization="gguf": a GGUF file's blocks kept as they are

@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1"])
def test_gguf_block_decode_equals_the_gguf_library(qtype):
    import gguf

    from jaxpaged.gguf_blocks import GGUFBlocks, dequantize
    x = np.random.default_rng(2).standard_normal((6, 96)).astype(np.float32)        # [out, in]
    raw = gguf.quants.quantize(x, gguf.GGMLQuantizationType[qtype])
    ref = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype])
    np.testing.assert_array_equal(np.asarray(dequantize(jnp.asarray(raw), qtype)), ref)
    w = GGUFBlocks(jnp.asarray(raw), qtype)
    assert w.shape == (96, 6)                                                       # logical [in, out]
    a = jnp.asarray(np.random.default_rng(3).standard_normal((3, 96)), jnp.float32)
    np.testing.assert_allclose(np.asarray(w.matmul(a)), np.asarray(a) @ ref.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1"])
def test_native_block_matmul_equals_the_jnp_one(qtype):
    """cpu_kernels' GGUF block matmul on a stacked [L, N, RB] weight: each layer read in place (a traced
    layer under jit), rows past `rows` zero, equal to GGUFBlocks' dequantize-then-dot."""
    import gguf

    from cpu_kernels.gguf_matmul import gguf_matmul
    from jaxpaged.gguf_blocks import GGUFBlocks
    rng = np.random.default_rng(5)
    raw = np.stack([gguf.quants.quantize(rng.standard_normal((40, 96)).astype(np.float32) * (i + 1),
                                         gguf.GGMLQuantizationType[qtype]) for i in range(2)])
    blocks = jnp.asarray(raw)                                                        # [2, 40, RB]
    a = jnp.asarray(rng.standard_normal((5, 96)), jnp.float32)
    run = jax.jit(lambda a, layer: gguf_matmul(a, blocks, qtype=qtype, layer=layer, rows=jnp.int32(3)))
    for layer in (0, 1):
        out = np.asarray(run(a, jnp.int32(layer)))
        ref = np.asarray(GGUFBlocks(blocks[layer], qtype).matmul(a))
        np.testing.assert_allclose(out[:3], ref[:3], rtol=1e-5, atol=1e-4)
        assert out.shape == (5, 40) and not out[3:].any()


def test_gguf_blocks_kept_through_the_engine(smollm2_gguf, tmp_path):
    from jaxpaged import LLM
    from jaxpaged.gguf_blocks import GGUFBlocks

    args = dict(max_model_len=256, max_num_seqs=4, max_num_batched_tokens=32, enforce_eager=True,
                download_dir=str(tmp_path))
    kept = LLM(smollm2_gguf, quantization="gguf", **args)
    is_b = lambda x: isinstance(x, GGUFBlocks)
    blocks = [x for x in jax.tree_util.tree_leaves(kept.llm_engine.runner.state, is_leaf=is_b) if is_b(x)]
    assert len(blocks) == 7 and {b.qtype for b in blocks} == {"Q4_1"}
    if kept.llm_engine.runner.attention_backend == "native":     # read by the native block matmul
        from jaxpaged.backends.native import NativeBlocks
        is_n = lambda x: isinstance(x, NativeBlocks)
        assert len([x for x in jax.tree_util.tree_leaves(kept.llm_engine.runner.state, is_leaf=is_n) if is_n(x)]) == 7
    # memory: the file's Q4_1 bytes, 20 per 32 weights, <= 0.2x of float32 (the bar)
    linear_f32 = sum(4 * int(np.prod(b.shape)) for b in blocks)
    assert sum(b.nbytes() for b in blocks) <= 0.2 * linear_f32
    dense = LLM(smollm2_gguf, **args)           # the same file dequantized to float32
    greedy = SamplingParams(temperature=0.0, max_tokens=8)
    prompts = ["The capital of France is", "def fibonacci(n):"]
    toks = lambda llm: [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
    assert toks(kept) == toks(dense)


def test_gguf_scheme_needs_a_gguf_file_and_one_device(tiny_llama, tmp_path):
    from jaxpaged import LLM
    with pytest.raises(ValueError, match="quantization: 'gguf' keeps a .gguf file's blocks"):
        LLM(tiny_llama, quantization="gguf", enforce_eager=True, download_dir=str(tmp_path))
    with pytest.raises(ValueError, match="quantization: 'gguf' blocks run on one device"):
        EngineConfig(quantization="gguf", tensor_parallel_size=2)


def test_perplexity_bench_equals_transformers(tiny_llama, tmp_path_factory):
    """bench perplexity's figure = exp(mean NLL) of transformers' log-probs over the same windows."""
    from jaxpaged.bench.perplexity import perplexity
    from tests.hf_reference import hf_logprobs, hf_model

    ids = [int(i) for i in np.random.default_rng(4).integers(3, 320, 45)]
    llm = make_llm(tiny_llama, tmp_path_factory, max_num_batched_tokens=64, max_model_len=128)
    ppl, n = perplexity(llm, ids, window=20)                  # windows of 20, 20 and 5 tokens
    model = hf_model("llama")
    nll = []
    for start in range(0, len(ids), 20):
        w = ids[start:start + 20]
        lp = hf_logprobs(model, w)
        nll += [-lp[i - 1, w[i]] for i in range(1, len(w))]
    assert n == len(nll) == 42
    assert ppl == pytest.approx(float(np.exp(np.mean(nll))), rel=1e-4)
    with pytest.raises(ValueError, match="window: must be >= 2"):
        perplexity(llm, ids, window=1)


def test_int8_is_quantized_once_at_conversion_and_cached(tiny_llama, tmp_path):
    import os

    from jaxpaged.convert import load_model
    first = load_model(tiny_llama, cache_dir=str(tmp_path), write_cache=True, quantization="int8", progress=False)
    again = load_model(tiny_llama, cache_dir=str(tmp_path), quantization="int8", progress=False)
    assert not first.from_cache and again.from_cache
    assert [e for e in os.listdir(tmp_path) if "-float32-int8-" in e]          # the scheme is in the key
    dense = load_model(tiny_llama, cache_dir=str(tmp_path), write_cache=True, progress=False)
    assert not dense.from_cache                                              # its own entry, not the int8 one
    for name in ("q_proj", "down_proj"):
        a, b = first.params["layers"][name]["kernel"], again.params["layers"][name]["kernel"]
        assert isinstance(a, Int8Weight) and isinstance(b, Int8Weight)
        np.testing.assert_array_equal(np.asarray(a.q), np.asarray(b.q))
        np.testing.assert_array_equal(np.asarray(a.scale), np.asarray(b.scale))
        ref = quantize_int8(dense.params["layers"][name]["kernel"])
        np.testing.assert_array_equal(np.asarray(a.q), np.asarray(ref.q))
    assert isinstance(again.params["embed"]["embedding"], np.ndarray)          # the embedding stays dense
