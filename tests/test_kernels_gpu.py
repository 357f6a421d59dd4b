"""The Pallas kernels compiled for a real GPU (interpret=False, Triton) against the jnp references.

Marked `gpu`; skipped where jax sees no GPU. Shapes reuse tests/test_kernels.py's builder
(NaN in every page the kernel must not read, permuted tables, padding rows/sequences).
"""
from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from pallas_kernels import kv_cache_write, kv_cache_write_reference
from tests.test_kernels import (_without_null_block, boundary_lengths, check_against_reference,
                                make_batch, make_write)


def _has_gpu() -> bool:
    try:
        return any(d.platform == "gpu" for d in jax.devices())
    except RuntimeError:
        return False


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _has_gpu(), reason="no GPU visible to jax")]


# the attention kernels of this jax line: Triton everywhere, Mosaic GPU from jax 0.11 (it takes
# bf16/f16 with head_dim 64/128 and pages dividing 64; other shapes fall back to Triton)
@pytest.fixture(params=["triton"] + (["mosaic"] if jax.__version_info__ >= (0, 11) else []))
def gpu_kernel(request):
    return request.param


@pytest.mark.parametrize("block_size,num_heads,num_kv_heads,head_dim",
                         [(8, 2, 2, 64), (16, 6, 2, 128), (32, 8, 1, 64), (16, 24, 8, 128), (24, 8, 2, 80)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_page_boundaries_on_gpu(block_size, num_heads, num_kv_heads, head_dim, dtype, gpu_kernel):
    width = 4
    lens = boundary_lengths(block_size, width)
    x = make_batch([1] * len(lens) + lens, lens + lens, num_heads=num_heads, num_kv_heads=num_kv_heads,
                   head_dim=head_dim, block_size=block_size, width=width, dtype=dtype)
    check_against_reference(x, interpret=False, gpu_kernel=gpu_kernel)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_mixed_batch_on_gpu(dtype, gpu_kernel):
    rng = np.random.default_rng(1)
    dec_lens = [int(n) for n in rng.integers(1, 2000, 100)]
    q_lens = [512, 300, 100, 5] + [1] * len(dec_lens)
    seq_lens = [512, 900, 1300, 40] + dec_lens
    x = make_batch(q_lens, seq_lens, num_heads=12, num_kv_heads=4, head_dim=64, block_size=16,
                   dtype=dtype, pad_seqs=3, pad_tokens=40)
    check_against_reference(x, interpret=False, gpu_kernel=gpu_kernel)


@pytest.mark.parametrize("soft_cap,window", [(30.0, None), (None, 100), (20.0, 37)])
def test_soft_cap_and_sliding_window_on_gpu(soft_cap, window, gpu_kernel):
    q_lens, seq_lens = [1, 1, 200, 70, 1], [900, 16, 200, 400, 130]
    x = make_batch(q_lens, seq_lens, num_heads=8, num_kv_heads=2, head_dim=128, block_size=16,
                   window=window)
    check_against_reference(x, interpret=False, gpu_kernel=gpu_kernel, soft_cap=soft_cap,
                            sliding_window=window)


def test_layer_form_on_gpu(gpu_kernel):
    x = make_batch([64, 1, 1], [100, 20, 64], num_heads=8, num_kv_heads=2, head_dim=64, block_size=16,
                   num_layers=3, dtype=jnp.bfloat16)
    check_against_reference(x, interpret=False, gpu_kernel=gpu_kernel, layer=jnp.int32(2))


@pytest.mark.parametrize("num_layers", [None, 3])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kv_cache_write_on_gpu(num_layers, dtype):
    k, v, k_new, v_new, slots = make_write(45, 6, num_layers=num_layers, dtype=dtype, head_dim=128)
    layer = None if num_layers is None else jnp.int32(1)
    out = kv_cache_write(k, v, k_new, v_new, slots, layer=layer, interpret=False)
    ref = kv_cache_write_reference(k, v, k_new, v_new, slots, layer=layer)
    for a, r in zip(out, ref):
        np.testing.assert_array_equal(_without_null_block(a), _without_null_block(r))


@pytest.mark.parametrize("storage", [jnp.int8, jnp.float8_e4m3fn])
@pytest.mark.parametrize("head_dim,block_size", [(64, 16), (128, 32), (80, 16)])
def test_8bit_cache_on_gpu(storage, head_dim, block_size):
    """An int8 / e4m3 cache with row scales (kv_cache_dtype="int8" / "fp8"): the Triton kernel on the GPU
    equals the reference over the same 8-bit pages (bf16 queries; 8-bit caches always run Triton)."""
    from pallas_kernels import ragged_paged_attention, ragged_paged_attention_reference
    from pallas_kernels.kv_quant import quantize_kv
    dec = [int(n) for n in np.random.default_rng(2).integers(1, 900, 24)]
    x = make_batch([300, 40] + [1] * len(dec), [700, 40] + dec, num_heads=8, num_kv_heads=2,
                   head_dim=head_dim, block_size=block_size, dtype=jnp.bfloat16)
    (k, ks), (v, vs) = (quantize_kv(jnp.nan_to_num(x[n].astype(jnp.float32)), storage) for n in ("k", "v"))
    args = (x["q"], k, v, x["block_tables"], x["seq_lens"], x["query_start"])
    kw = dict(sm_scale=head_dim ** -0.5, k_scales=ks, v_scales=vs)
    out = ragged_paged_attention(*args, interpret=False, **kw)
    ref = ragged_paged_attention_reference(*args, **kw)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=2e-2, rtol=0)


@pytest.mark.parametrize("m,k,n", [(1, 576, 1536), (5, 1536, 576), (64, 200, 77), (300, 4096, 1000)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_int8_matmul_on_gpu(m, k, n, dtype):
    """The int8-weight matmul (pallas_kernels/int8_matmul.py, Triton) compiled on the GPU, on a stacked
    weight read at layer 1, against the exact (f64, host) value of (x @ q) * scale."""
    from pallas_kernels.int8_matmul import int8_matmul, pad_weight
    from jaxpaged.quantization import quantize_int8
    rng = np.random.default_rng(m + k)
    w = quantize_int8(rng.standard_normal((2, k, n)).astype(np.float32) * 0.05)
    x = jnp.asarray(rng.standard_normal((m, k)), dtype)
    q, scale = pad_weight(jnp.asarray(w.q), jnp.asarray(w.scale))
    out = np.asarray(int8_matmul(x, q, scale, jnp.int32(1), n=n, interpret=False))
    ref = (np.asarray(x, np.float64) @ w.q[1].astype(np.float64)) * w.scale[1]
    assert out.shape == (m, n) and out.dtype == np.float32
    # exact products (bf16 / f32 times int8), f32 accumulation: only rounding of the sums differs
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1"])
@pytest.mark.parametrize("m,k,n", [(1, 576, 1536), (5, 1536, 577), (64, 4096, 1000)])
def test_gguf_matmul_on_gpu(qtype, m, k, n):
    """The GGUF block matmul (pallas_kernels/gguf_matmul.py, Triton) compiled on the GPU, on stacked
    blocks read at layer 1, against the exact (f64, host) product with gguf's own dequantization."""
    import gguf
    from pallas_kernels.gguf_matmul import gguf_matmul
    rng = np.random.default_rng(m + n)
    raw = np.stack([gguf.quants.quantize(rng.standard_normal((n, k)).astype(np.float32) * 0.05,
                                         gguf.GGMLQuantizationType[qtype]) for _ in range(2)])
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    out = np.asarray(gguf_matmul(x, jnp.asarray(raw), jnp.int32(1), qtype=qtype, interpret=False))
    w = gguf.quants.dequantize(raw[1], gguf.GGMLQuantizationType[qtype]).astype(np.float64)      # [N, K]
    ref = np.asarray(x, np.float64) @ w.T
    assert out.shape == (m, n) and out.dtype == np.float32
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5 * np.abs(ref).max())
