"""An 8-bit KV cache (EngineConfig.kv_cache_dtype="int8" / "fp8"): the row quantizer, every attention
kernel's 8-bit read path, the pool's block count, and the engine end to end (copy-on-write, prefix
caching, tensor parallelism) against the full-precision cache."""
from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from cpu_kernels import ragged_paged_attention_cpu
from jaxpaged import SamplingParams
from jaxpaged.backends.kv_storage import QuantizedPages
from jaxpaged.engine_config import EngineConfig
from jaxpaged.kv_dtypes import kv_bytes_per_block
from pallas_kernels import ragged_paged_attention, ragged_paged_attention_reference
from pallas_kernels.attention_triton import gpu_tiling
from pallas_kernels.kv_quant import dequantize_kv, quantize_kv
from tests.engine_utils import make_llm
from tests.test_kernels import make_batch

STORAGE = {"int8": jnp.int8, "fp8": jnp.float8_e4m3fn, "fp8-bits": jnp.uint8}
# max |attention output - the full-precision cache's| on unit-normal K/V (outputs are ~0.1-1)
FULL_PRECISION_TOL = {"int8": 0.05, "fp8": 0.25, "fp8-bits": 0.25}


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_rows_quantize_with_one_scale_each(fmt):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 3, 64)).astype(np.float32) * rng.uniform(0.01, 30, (5, 3, 1))
    x[2, 1] = 0.0                                                  # an all-zero row
    q, scale = quantize_kv(jnp.asarray(x), STORAGE[fmt])
    assert q.dtype == STORAGE[fmt] and q.shape == x.shape and scale.shape == (5, 3) and scale.dtype == jnp.float32
    back = np.asarray(dequantize_kv(q, scale))
    amax = np.abs(x).max(-1)
    np.testing.assert_allclose(np.abs(back).max(-1), amax, rtol=1e-6)   # each row's largest |x| is exact
    if fmt == "int8":
        assert (np.abs(back - x) <= np.asarray(scale)[..., None] / 2 + 1e-6).all()   # half a step
    else:
        assert (np.abs(back - x) <= np.abs(x) / 16 + amax[..., None] * 2.0 ** -9).all()   # 3 mantissa bits
    assert not back[2, 1].any() and float(scale[2, 1]) == 0.0


def _quantized(x, storage):
    """The batch's cache quantized (NaN pages -- never read -- as zeros) + its dequantized twin."""
    out = {}
    for name in ("k", "v"):
        q, s = quantize_kv(jnp.nan_to_num(x[name]), storage)
        out[name], out[name + "_scales"], out[name + "_deq"] = q, s, dequantize_kv(q, s)
    return out


KERNELS = {
    "jnp": ragged_paged_attention_reference,
    "pallas": ragged_paged_attention,
    "triton-interpret": lambda *a, **kw: ragged_paged_attention(*a, tiling=gpu_tiling(8, 2, 64, 3, 128), **kw),
    "native": ragged_paged_attention_cpu,
}


# every kernel on int8; e4m3 on the two that decode it their own way (the Pallas kernels share the
# references' dequantize_kv; their CUDA lowering with e4m3 pages is in test_kernels_gpu_lowering.py)
@pytest.mark.parametrize("kernel,fmt", [(k, "int8") for k in sorted(KERNELS)] + [("jnp", "fp8"), ("native", "fp8")])
def test_kernels_read_8bit_pages(kernel, fmt):
    """Decodes, a prefill chunk (and the native kernel's row paths: decode vectors, prefill lanes)
    over int8 / e4m3 pages: equal to attention over the dequantized pages, and close to the
    full-precision cache."""
    x = make_batch([1, 3, 24], [9, 40, 24], num_heads=8, num_kv_heads=2, head_dim=64, block_size=16)
    qx = _quantized(x, STORAGE[fmt])
    args = (x["block_tables"], x["seq_lens"], x["query_start"])
    kw = dict(sm_scale=0.125, sliding_window=30)
    out = KERNELS[kernel](x["q"], qx["k"], qx["v"], *args, k_scales=qx["k_scales"], v_scales=qx["v_scales"], **kw)
    deq = ragged_paged_attention_reference(x["q"], qx["k_deq"], qx["v_deq"], *args, **kw)
    full = ragged_paged_attention_reference(x["q"], x["k"], x["v"], *args, **kw)
    assert out.dtype == x["q"].dtype and np.isfinite(np.asarray(out)).all()
    np.testing.assert_allclose(np.asarray(out), np.asarray(deq), atol=1e-5, rtol=0)
    err = float(jnp.abs(out - full).max())
    assert 0 < err < FULL_PRECISION_TOL[fmt]


@pytest.mark.parametrize("head_dim,block_size", [(128, 8), (80, 32)])
def test_native_8bit_head_dims_and_bit_patterns(head_dim, block_size):
    """The native kernel's other head dims (80: its direct path) and e4m3 held as uint8 bits."""
    x = make_batch([1, 2, 17], [30, 9, 40], num_heads=4, num_kv_heads=2, head_dim=head_dim, block_size=block_size)
    args = (x["block_tables"], x["seq_lens"], x["query_start"])
    for storage in (jnp.int8, jnp.uint8):
        qx = _quantized(x, storage)
        out = ragged_paged_attention_cpu(x["q"], qx["k"], qx["v"], *args, sm_scale=0.1, soft_cap=4.0,
                                         k_scales=qx["k_scales"], v_scales=qx["v_scales"])
        deq = ragged_paged_attention_reference(x["q"], qx["k_deq"], qx["v_deq"], *args, sm_scale=0.1, soft_cap=4.0)
        np.testing.assert_allclose(np.asarray(out), np.asarray(deq), atol=1e-5, rtol=0)


def test_8bit_pages_need_their_scales():
    x = make_batch([1], [5], num_heads=2, num_kv_heads=1, head_dim=64, block_size=8)
    qx = _quantized(x, jnp.int8)
    args = (x["q"], qx["k"], qx["v"], x["block_tables"], x["seq_lens"], x["query_start"])
    for fn in (ragged_paged_attention_reference, ragged_paged_attention, ragged_paged_attention_cpu):
        with pytest.raises(ValueError, match="needs k_scales and v_scales"):
            fn(*args, sm_scale=0.1)
        with pytest.raises(ValueError, match="scales must be"):
            fn(*args, sm_scale=0.1, k_scales=qx["k_scales"][:, :-1], v_scales=qx["v_scales"])


def test_kv_cache_dtype_names_are_checked_where_they_enter():
    assert EngineConfig(kv_cache_dtype="fp8").kv_cache_dtype == "fp8_e4m3"
    assert EngineConfig(kv_cache_dtype="INT8").kv_cache_dtype == "int8"
    assert EngineConfig(kv_cache_dtype="bf16").kv_cache_dtype == "bfloat16"
    for bad in ("int4", "fp8_e5m2", ""):
        with pytest.raises(ValueError, match="kv_cache_dtype: expected one of"):
            EngineConfig(kv_cache_dtype=bad)


def _prompt_logprobs(out, prompt):
    return np.array([out.prompt_logprobs[i][t].logprob for i, t in enumerate(prompt) if i > 0])


@pytest.mark.parametrize("backend,kv_dtype,pages,logprob_tol", [("native", "int8", jnp.int8, 0.05),
                                                                 ("jnp", "int8", jnp.int8, 0.05),
                                                                 ("native", "fp8", jnp.uint8, 0.3)])
def test_engine_8bit_cache_end_to_end(backend, kv_dtype, pages, logprob_tol, tiny_llama, tmp_path_factory):
    """8-bit pages + scales in the pool (~4x the blocks of f32 in the same bytes, less the scales),
    prompt log-probs close to the f32 cache's (int8 within 0.05, e4m3's 3 mantissa bits within 0.3),
    n > 1 (copy-on-write of a shared block) and a prefix-cache hit on the second call; every block freed."""
    prompts = [[5, 17, 99, 3, 250, 41, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19], [300, 2, 2, 2, 61]]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, prompt_logprobs=1)
    kw = dict(max_num_batched_tokens=64, max_model_len=128, attention_backend=backend,
              kv_cache_memory_bytes=1 << 20)
    dense = make_llm(tiny_llama, tmp_path_factory, kv_cache_dtype="float32", **kw)
    int8 = make_llm(tiny_llama, tmp_path_factory, kv_cache_dtype=kv_dtype, **kw)
    cfg, engine = int8.llm_engine.model_config, int8.llm_engine
    k, v = engine.runner.kv_cache
    assert isinstance(k, QuantizedPages) and k.pages.dtype == pages and k.scales.dtype == jnp.float32
    assert k.scales.shape == k.pages.shape[:-1] and v.pages.shape == k.pages.shape
    per_block = 2 * cfg.num_layers * cfg.num_kv_heads * 16 * (cfg.head_dim + 4)
    assert kv_bytes_per_block(cfg, 16, engine.kv_cache_dtype) == per_block
    assert engine.kv_plan.num_blocks == (1 << 20) // per_block
    f32_block = 2 * cfg.num_layers * cfg.num_kv_heads * 16 * 4 * cfg.head_dim
    assert dense.llm_engine.kv_plan.num_blocks == (1 << 20) // f32_block
    # 4D / (D + 4) times the f32 blocks: 3.2x at this model's head_dim 16 (3.8x at 64, e.g. SmolLM2)
    assert engine.kv_plan.num_blocks >= 3.19 * dense.llm_engine.kv_plan.num_blocks
    out_d = dense.generate(prompts, params, use_tqdm=False)
    out_q = int8.generate(prompts, params, use_tqdm=False)
    for prompt, a, b in zip(prompts, out_d, out_q):
        assert len(b.outputs[0].token_ids) == 8
        assert np.abs(_prompt_logprobs(a, prompt) - _prompt_logprobs(b, prompt)).max() < logprob_tol
    # n = 2 shares the prompt's last partial block (copy-on-write); the repeated prompt hits the prefix cache
    hits_before = engine.scheduler.stats().prefix_cache_hits
    forked = int8.generate([prompts[0]], SamplingParams(temperature=0.0, max_tokens=4, n=2, ignore_eos=True),
                           use_tqdm=False)[0]
    assert engine.scheduler.stats().prefix_cache_hits > hits_before
    first = int8.generate([prompts[0]], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True),
                          use_tqdm=False)[0]
    assert forked.outputs[0].token_ids == forked.outputs[1].token_ids == first.outputs[0].token_ids
    assert engine.scheduler.stats().kv_cache_usage == 0.0


def test_int8_cache_tensor_parallel_equals_one_device(tmp_path, tiny_model_factory):
    """TP=2 shards the int8 pages and their scales by KV head; its tokens equal TP=1's."""
    from tests.test_tensor_parallel import run_worker
    path = tiny_model_factory("llama", num_key_value_heads=4)
    out = run_worker(tmp_path, "kvq", devices=2, model=path, tps=[1, 2], kv_cache_dtype="int8",
                     attention_backend="native")
    assert out["tokens"]["2"] == out["tokens"]["1"]
    pages, scales = out["kv_shards"]["2"], out["kv_scale_shards"]["2"]
    assert len(pages) == 2 and pages[0][1] == 2 and pages[0][:4] == scales[0]     # 4 KV heads / 2 each


def test_server_serves_with_an_int8_kv_cache(tiny_llama, tmp_path_factory, capsys):
    """--kv-cache-dtype int8: the flag reaches the engine, a completion through the app equals
    LLM.generate's with the same cache; a dtype no backend holds is a CLI error naming the field."""
    from fastapi.testclient import TestClient

    from jaxpaged.engine import LLMEngine
    from jaxpaged.server.app import build_app
    from jaxpaged.server.cli import parse_args

    cache = str(tmp_path_factory.getbasetemp() / "jp-cache")
    flags = ["--model", tiny_llama, "--kv-cache-dtype", "int8", "--max-model-len", "128", "--enforce-eager",
             "--max-num-batched-tokens", "64", "--download-dir", cache]
    _, config = parse_args(flags)
    assert config.kv_cache_dtype == "int8"
    expected = make_llm(tiny_llama, tmp_path_factory, kv_cache_dtype="int8", max_model_len=128,
                        max_num_batched_tokens=64).generate(
        ["Hello world"], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True), use_tqdm=False)[0]
    engine = LLMEngine(config, progress=False)
    assert isinstance(engine.runner.kv_cache[0], QuantizedPages)
    with TestClient(build_app(engine, "tiny")) as client:
        r = client.post("/v1/completions", json={"model": "tiny", "prompt": "Hello world", "max_tokens": 6,
                                                 "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == expected.outputs[0].text
        assert r.json()["usage"]["completion_tokens"] == 6
    with pytest.raises(SystemExit):
        parse_args(["--kv-cache-dtype", "int4"])
    assert "kv_cache_dtype: expected one of" in capsys.readouterr().err


def test_perplexity_bench_compares_kv_cache_dtypes(tiny_llama, tmp_path, capsys):
    """bench perplexity side by side: the f32 cache and --config kv_cache_dtype=int8 (D + 4 = 20 bytes
    a row instead of 64 at head_dim 16); the int8 cache's perplexity within 1% of the f32 one's."""
    from jaxpaged.bench.__main__ import main
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 12)
    main(["perplexity", "--model", tiny_llama, "--text", str(text), "--window", "32", "--kv-cache-dtype", "float32",
          "--config", "", "--config", "kv_cache_dtype=int8", "--download-dir", str(tmp_path / "cache")])
    lines = [line for line in capsys.readouterr().out.splitlines() if " ppl " in line]
    assert len(lines) == 2 and "KV float32" in lines[0] and "KV int8" in lines[1]
    per_token = [int(line.split(" B/token")[0].rsplit(" ", 1)[1]) for line in lines]
    assert per_token[0] * 20 == per_token[1] * 64
    delta = float(lines[1].split("(")[1].split("%")[0])
    assert abs(delta) < 1.0
