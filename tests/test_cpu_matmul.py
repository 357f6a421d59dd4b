"""The native packed weight matmul (cpu_kernels/matmul.cc): packing, every path against numpy, the
layer index, bad input, and its use by the engine."""
from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpu_kernels.matmul import PackedWeight, caps, pack, packed_matmul, worthwhile
from jaxpaged import SamplingParams
from tests.engine_utils import make_llm

# (M, K, N): decode- and prefill-sized rows; K and N off the 32-multiples (padding), one-row panels;
# K past 768 (the AVX2 6-row tiles split it into chunks: 1537 -> 769 + 768); M = 130 -> two row blocks
SHAPES = [(1, 64, 40), (1, 77, 50), (5, 96, 70), (7, 33, 17), (16, 32, 32), (33, 576, 200), (70, 100, 33),
          (130, 64, 96), (45, 1537, 72)]


def _reference(x, w):
    return np.asarray(x, np.float32) @ np.asarray(w, np.float32)


def _stacked(dtype, m, k, n, layers=3, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((layers, k, n)).astype(np.float32)
    x = rng.standard_normal((m, k)).astype(np.float32)
    return jnp.asarray(x).astype(dtype), jnp.asarray(w).astype(dtype)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_each_layer_matches_numpy(dtype, m, k, n):
    x, w = _stacked(dtype, m, k, n)
    packed = pack(w, stacked=True)
    run = jax.jit(lambda x, data, layer: packed_matmul(x, PackedWeight(data, layer, None, packed.k, packed.n)))
    for layer in range(w.shape[0]):
        y = np.asarray(run(x, packed.data, jnp.int32(layer)))
        assert y.shape == (m, n) and y.dtype == np.float32
        ref = _reference(x, w[layer])
        # bf16 inputs are exact in f32; both sides accumulate in f32 (order differs)
        np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_pack_layouts():
    w = jnp.arange(2 * 40 * 50, dtype=jnp.float32).reshape(2, 40, 50)
    f32 = pack(w, stacked=True)
    assert f32.data.shape == (2, 2, 40, 32) and (f32.k, f32.n) == (40, 50)
    # panel 1, row 7, column 3 -> W[l, 7, 32 + 3]; padded columns are zero
    assert f32.data[1, 1, 7, 3] == w[1, 7, 35] and f32.data[0, 1, 0, 31] == 0
    b16 = pack(w.astype(jnp.bfloat16), stacked=True)
    assert b16.data.shape == (2, 4, 2, 16, 32) and b16.data.dtype == jnp.uint16
    # tile column j = 2 (columns 32..47), tile kb = 1 (rows 32..63), tile row r = 3, col c = 5, e = 1:
    # row 32 + 2*3 + 1 = 39, column 32 + 5 = 37
    bits = jax.lax.bitcast_convert_type(w.astype(jnp.bfloat16), jnp.uint16)
    assert b16.data[1, 2, 1, 3, 2 * 5 + 1] == bits[1, 39, 37]
    assert b16.data[0, 0, 1, 15, 0] == 0          # row 62 >= K = 40: zero padding


def test_unstacked_weight_and_x_cast():
    x, w = _stacked("float32", 6, 48, 20, layers=1)
    packed = pack(w[0], stacked=False)
    y = np.asarray(jax.jit(packed_matmul)(x.astype(jnp.bfloat16), packed))   # x cast to the weight's f32
    np.testing.assert_allclose(y, _reference(x.astype(jnp.bfloat16), w[0]), rtol=1e-5, atol=1e-4)


def test_bad_x_raises_value_error():
    packed = pack(jnp.ones((32, 32), jnp.float32), stacked=False)
    with pytest.raises(ValueError, match=r"x must be \[M, 32\]"):
        packed_matmul(jnp.ones((4, 16), jnp.float32), packed)


def test_portable_loops_match_numpy():
    # the fallback loops every CPU without AVX-512 / AMX runs: forced in a fresh process
    code = (
        "import numpy as np, jax, jax.numpy as jnp\n"
        "from cpu_kernels.matmul import pack, packed_matmul, caps\n"
        "assert caps() == 0, caps()\n"
        "rng = np.random.default_rng(1)\n"
        "for dt in ('float32', 'bfloat16'):\n"
        "    for m, k, n in [(3, 64, 40), (37, 96, 70)]:\n"
        "        w = jnp.asarray(rng.standard_normal((k, n)), jnp.float32).astype(dt)\n"
        "        x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32).astype(dt)\n"
        "        y = np.asarray(packed_matmul(x, pack(w, stacked=False)))\n"
        "        ref = np.asarray(x, np.float32) @ np.asarray(w, np.float32)\n"
        "        np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-3)\n"
        "print('portable ok')\n")
    env = dict(os.environ, JAXPAGED_NATIVE_PORTABLE="1")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "portable ok" in done.stdout


def _lowered_text(runner) -> str:
    from jaxpaged.step_inputs import build_step_inputs
    t, b = runner.buckets.pairs()[0]
    inputs = build_step_inputs([], block_size=runner.block_size, table_width=runner.table_width,
                               num_tokens_padded=t, num_seqs_padded=b)
    names = ("token_ids", "positions", "slot_mapping", "block_tables", "seq_lens", "query_start",
             "logits_indices")
    arrays = {k: getattr(inputs, k) for k in names}
    return runner._forward.lower(None, runner.state, runner.kv_cache, arrays).as_text()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_engine_packs_weights_and_matches_xla_dot(tiny_llama, tmp_path_factory, monkeypatch, dtype):
    # packing forced on whatever this CPU is (without AVX-512/AMX the kernel runs its portable loops)
    import cpu_kernels.matmul
    monkeypatch.setattr(cpu_kernels.matmul, "worthwhile", lambda dt: True)
    greedy = SamplingParams(max_tokens=12, temperature=0.0)
    prompts = ["Hello there", "The quick brown fox jumps", "a b c d e f g"]
    native = make_llm(tiny_llama, tmp_path_factory, max_num_batched_tokens=64, dtype=dtype)
    xla = make_llm(tiny_llama, tmp_path_factory, max_num_batched_tokens=64, native_matmul=False, dtype=dtype)
    rn, rx = native.llm_engine.runner, xla.llm_engine.runner
    assert rn.native_matmul and not rx.native_matmul
    is_packed = lambda v: isinstance(v, PackedWeight)
    packed = lambda r: [x for x in jax.tree_util.tree_leaves(r.state, is_leaf=is_packed) if is_packed(x)]
    # 7 stacked Linear kernels + the LM head (the tied table's packed twin, beside the lookup table)
    assert len(packed(rn)) == 8 and not packed(rx)
    assert sum(x.data.shape[0] == 1 for x in packed(rn)) == 1        # one unstacked: the head
    # q, k, v, o, gate, up, down (one custom call each in the scan body) + the LM head
    assert _lowered_text(rn).count("jaxpaged_matmul") == 8
    assert "jaxpaged_matmul" not in _lowered_text(rx)
    tokens = lambda llm: [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
    assert tokens(native) == tokens(xla)


def test_native_matmul_off_without_the_native_backend(tiny_llama, tmp_path_factory):
    llm = make_llm(tiny_llama, tmp_path_factory, attention_backend="pallas", max_num_batched_tokens=64)
    runner = llm.llm_engine.runner
    assert not runner.native_matmul
    assert not [x for x in jax.tree_util.tree_leaves(runner.state, is_leaf=lambda v: isinstance(v, PackedWeight))
                if isinstance(x, PackedWeight)]


def test_caps_reports_this_cpu():
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    assert bool(caps() & 1) == (" avx512f" in flags)
    assert bool(caps() & 4) == (" avx2" in flags and " fma" in flags)
    if " amx_bf16" not in flags:
        assert not caps() & 2


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_rows_past_valid_are_skipped_and_zero(dtype):
    x, w = _stacked(dtype, 40, 64, 48, layers=2)
    packed = pack(w, stacked=True)
    run = jax.jit(lambda x, rows: packed_matmul(x, packed.at_layer(jnp.int32(1), rows)))
    ref = _reference(x, w[1])
    for rows in (0, 1, 17, 33, 40, 99):          # 99: clamped to M
        y = np.asarray(run(x, jnp.int32(rows)))
        real = min(rows, 40)
        np.testing.assert_allclose(y[:real], ref[:real], rtol=1e-4, atol=1e-4 * np.abs(ref).max())
        assert not y[real:].any()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_prefill_rows_agree_over_row_blocks_and_k_chunks(dtype):
    """A full prefill chunk (512 rows) on the native tiles: on AVX2 the rows split into blocks of whole
    6-row micro-panels (512 -> 5 x 108, the last 80; 300 real rows -> 3 x 102, the last 96) and K = 1000
    into two 500-deep passes (bf16 without AMX: the same f32 tiles on x and panels widened to K = 1024);
    every row equals numpy, rows past `rows` are zero, the layer clamps."""
    x, w = _stacked(dtype, 512, 1000, 1000, layers=2)             # N off the 32-multiples
    packed = pack(w, stacked=True)
    ref = _reference(x, w[1])
    tol = dict(rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    run = jax.jit(lambda x, layer, rows: packed_matmul(x, packed.at_layer(layer, rows)))
    for layer, rows in ((1, 512), (1, 300), (7, 511)):            # 7: clamped to the last layer
        y = np.asarray(run(x, jnp.int32(layer), jnp.int32(rows)))
        np.testing.assert_allclose(y[:rows], ref[:rows], **tol)
        assert not y[rows:].any()
