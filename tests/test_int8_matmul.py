"""The native int8-weight matmul (cpu_kernels/int8_matmul.cc): packing, every path against numpy on
odd shapes, rows past `rows`, the portable loops, and its use by the engine (quantization="int8")."""
from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpu_kernels.int8_matmul import PackedInt8Weight, caps, int8_matmul, pack_int8
from jaxpaged import LLM, SamplingParams
from jaxpaged.quantization import quantize_int8

# (M, K, N): one row (the decode kernel), odd K, N off the 32-multiple, a partial last 6-row tile,
# K over the 256-row chunk, more rows than a work unit (96)
SHAPES = [(1, 77, 50), (1, 576, 200), (5, 96, 70), (7, 33, 17), (16, 32, 32), (33, 301, 40), (130, 64, 96)]


def _case(m, k, n, layers=2, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((layers, k, n)).astype(np.float32) * rng.uniform(0.1, 2.0, (layers, 1, n))
    qw = quantize_int8(w)
    x = rng.standard_normal((m, k)).astype(np.float32)
    return x, qw


def _reference(x, qw, layer):
    # the stored int8 values times their scales, in f64: the kernel's f32 sums differ by rounding only
    w = np.asarray(qw.q[layer], np.float64) * np.asarray(qw.scale[layer], np.float64)[None, :]
    return np.asarray(x, np.float64) @ w


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_each_layer_matches_numpy(m, k, n):
    x, qw = _case(m, k, n)
    packed = pack_int8(qw.q, qw.scale, stacked=True)
    run = jax.jit(lambda x, data, layer: int8_matmul(x, PackedInt8Weight(data, layer, None, packed.k, packed.n)))
    for layer in range(2):
        ref = _reference(x, qw, layer)
        y = np.asarray(run(jnp.asarray(x), packed.data, jnp.int32(layer)))
        assert y.shape == (m, n) and y.dtype == np.float32
        np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
        # bf16 activations: widened to f32 in the kernel (exact), then the same sums
        xb = jnp.asarray(x, jnp.bfloat16)
        yb = np.asarray(run(xb, packed.data, jnp.int32(layer)))
        refb = _reference(np.asarray(xb, np.float32), qw, layer)
        np.testing.assert_allclose(yb, refb, rtol=1e-5, atol=1e-5 * np.abs(refb).max())


def test_pack_layout_holds_panels_then_scales():
    x, qw = _case(1, 40, 50)
    p = pack_int8(qw.q, qw.scale, stacked=True)
    assert p.data.shape == (2, 2, 32 * 40 + 128) and p.data.dtype == jnp.int8 and (p.k, p.n) == (40, 50)
    data = np.asarray(p.data)
    # layer 1, panel 1, k = 7, column 3 -> q[1, 7, 32 + 3]; the padded columns are zero
    assert data[1, 1, 32 * 7 + 3] == qw.q[1, 7, 35] and not data[0, 1, 32 * 7 + 18:32 * 7 + 32].any()
    scales = data[:, :, 32 * 40:].copy().view("<f4")                            # [2, 2, 32]
    np.testing.assert_array_equal(scales[1, 1, :18], qw.scale[1, 32:])
    assert (scales[:, 1, 18:] == 1.0).all()                                     # padded columns: scale 1
    unstacked = pack_int8(qw.q[0], qw.scale[0], stacked=False)
    np.testing.assert_array_equal(np.asarray(unstacked.data)[0], data[0])


def test_rows_past_valid_are_skipped_and_zero():
    x, qw = _case(40, 64, 48)
    packed = pack_int8(qw.q, qw.scale, stacked=True)
    run = jax.jit(lambda x, rows: int8_matmul(x, packed.at_layer(jnp.int32(1), rows)))
    ref = _reference(x, qw, 1)
    for rows in (0, 1, 17, 40, 99):              # 99: clamped to M
        y = np.asarray(run(jnp.asarray(x), jnp.int32(rows)))
        real = min(rows, 40)
        np.testing.assert_allclose(y[:real], ref[:real], rtol=1e-5, atol=1e-5 * np.abs(ref).max())
        assert not y[real:].any()


def test_bad_input_raises_value_error():
    x, qw = _case(1, 32, 32)
    packed = pack_int8(qw.q, qw.scale, stacked=True)
    with pytest.raises(ValueError, match=r"x must be \[M, 32\]"):
        int8_matmul(jnp.ones((4, 16), jnp.float32), packed)
    with pytest.raises(ValueError, match=r"scale must be \[2, 32\]"):
        pack_int8(qw.q, qw.scale[:, :8], stacked=True)


def test_portable_loops_match_numpy():
    # the loops a CPU without AVX2 + FMA runs: forced in a fresh process
    code = (
        "import numpy as np, jax.numpy as jnp\n"
        "from cpu_kernels.int8_matmul import pack_int8, int8_matmul, caps\n"
        "from jaxpaged.quantization import quantize_int8\n"
        "assert caps() == 0, caps()\n"
        "rng = np.random.default_rng(1)\n"
        "for m, k, n in [(1, 77, 50), (37, 96, 70)]:\n"
        "    qw = quantize_int8(rng.standard_normal((k, n)).astype(np.float32))\n"
        "    x = rng.standard_normal((m, k)).astype(np.float32)\n"
        "    for xx in (jnp.asarray(x), jnp.asarray(x, jnp.bfloat16)):\n"
        "        y = np.asarray(int8_matmul(xx, pack_int8(qw.q, qw.scale, stacked=False)))\n"
        "        ref = np.asarray(xx, np.float32) @ (qw.q.astype(np.float32) * qw.scale)\n"
        "        np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())\n"
        "print('portable ok')\n")
    env = dict(os.environ, JAXPAGED_NATIVE_PORTABLE="1")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "portable ok" in done.stdout


def test_caps_reports_this_cpu():
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    assert bool(caps() & 4) == (" avx2" in flags and " fma" in flags)


def test_engine_runs_int8_weights_on_the_native_kernel(tiny_llama, tmp_path, monkeypatch):
    """quantization="int8" on the native backend: the 7 stacked kernels become PackedInt8 (one
    jaxpaged_int8_matmul custom call each in the layer scan), the tied LM head a packed dense weight;
    the tokens equal XLA's int8 dot; a second start reads the packed int8 panels from the cache."""
    import cpu_kernels.matmul as mm
    from jaxpaged.backends.native import PackedInt8
    from jaxpaged.quantization import Int8Weight
    from tests.test_cpu_matmul import _lowered_text
    monkeypatch.setattr(mm, "worthwhile", lambda dt: True)    # packing forced on whatever this CPU is
    kw = dict(download_dir=str(tmp_path), max_num_seqs=4, max_num_batched_tokens=32, max_model_len=64,
              enforce_eager=True, quantization="int8")
    native = LLM(tiny_llama, **kw)
    xla = LLM(tiny_llama, native_matmul=False, **kw)
    rn, rx = native.llm_engine.runner, xla.llm_engine.runner
    of = lambda r, t: [x for x in jax.tree_util.tree_leaves(r.state, is_leaf=lambda v: isinstance(v, t))
                       if isinstance(x, t)]
    assert rn.native_matmul and len(of(rn, PackedInt8)) == 7 and not of(rn, Int8Weight)
    assert not rx.native_matmul and len(of(rx, Int8Weight)) == 7 and not of(rx, PackedInt8)
    # the memory bar holds for the packed form too (int8 + 4 bytes of scale per padded column)
    assert sum(w.nbytes() for w in of(rn, PackedInt8)) <= 0.3 * sum(4 * w.q.size for w in of(rx, Int8Weight))
    text = _lowered_text(rn)
    assert text.count("jaxpaged_int8_matmul") == 7 and text.count("jaxpaged_matmul") == 1   # + the LM head
    assert "jaxpaged_int8_matmul" not in _lowered_text(rx)
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    prompts = ["Hello there", "The quick brown fox jumps", "a b c d e f g"]
    tokens = lambda llm: [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
    want = tokens(native)
    assert want == tokens(xla)
    cache = rn.packed_cache
    assert (cache.hits, cache.misses) == (0, 8) and cache.final.endswith("-int8p1")
    del native
    again = LLM(tiny_llama, **kw)
    assert (again.llm_engine.runner.packed_cache.hits, again.llm_engine.runner.packed_cache.misses) == (8, 0)
    assert len(of(again.llm_engine.runner, PackedInt8)) == 7 and tokens(again) == want


def test_int8_kernel_under_a_lora_adapter_equals_xla(tiny_llama, tmp_path, monkeypatch):
    """A LoRA target's base weight may be the packed int8 one: the adapter's delta adds to the native
    int8 kernel's output (greedy tokens = the same int8 model on XLA's dot, with and without it)."""
    import cpu_kernels.matmul as mm
    from jaxpaged.lora import LoRARequest
    from tests.lora_utils import make_adapter
    monkeypatch.setattr(mm, "worthwhile", lambda dt: True)
    adapter = make_adapter(tiny_llama, str(tmp_path / "qv"), r=4, alpha=8, targets=("q_proj", "v_proj"), seed=3)
    kw = dict(download_dir=str(tmp_path), max_num_seqs=4, max_num_batched_tokens=32, max_model_len=64,
              enforce_eager=True, quantization="int8", enable_lora=True, max_loras=1, max_lora_rank=4)
    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    prompts = ["Hello there", "a b c d e f g"]
    loras = [LoRARequest("qv", 1, adapter), None]
    run = lambda llm: [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, lora_request=loras,
                                                                       use_tqdm=False)]
    native, xla = LLM(tiny_llama, **kw), LLM(tiny_llama, native_matmul=False, **kw)
    assert native.llm_engine.runner.native_matmul
    assert run(native) == run(xla)
