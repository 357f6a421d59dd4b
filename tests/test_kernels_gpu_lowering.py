"""The Pallas kernels lower for CUDA on a machine with no GPU, at realistic shapes, on both jax lines.

`jax.export` for platform "cuda" runs the Pallas GPU lowering, which builds the kernel IR at
export time: a kernel using something the GPU backend cannot do fails here. On jax >= 0.11 the
lowering targets an abstract H200 (pallas_kernels.lowering.target_gpu) and the attention lowers
with Mosaic GPU where it applies (bf16/f16, head_dim 64/128); CI runs this file in a Python 3.12
venv with jax 0.11+ too (.ci/run). Compiling the IR to machine code only happens on a
GPU: tests/test_kernels_gpu.py.
"""
from __future__ import annotations

import pytest

import jax
import jax.numpy as jnp

from pallas_kernels import kv_cache_write, ragged_paged_attention
from pallas_kernels.ragged_paged_attention import gpu_kernel_choice
from pallas_kernels.lowering import TRITON_CALL, export_for_cuda, kernel_calls, operand_types, triton_grid

S = jax.ShapeDtypeStruct
CONTEXT = 32768
# (NH, KVH, D): SmolLM2-135M, Llama-3-8B, a head_dim 80 model (Phi-2 like) and a 96 one (Phi-3-mini like)
MODELS = {"smollm2": (9, 3, 64), "llama3-8b": (32, 8, 128), "d80": (32, 32, 80), "d96": (32, 32, 96)}


def _cache(num_layers, kvh, bs, d, dtype, num_blocks=None):
    return S((num_layers, kvh, num_blocks or CONTEXT // bs + 1, bs, d), dtype)


def _attention_args(model, bs, batch, num_tokens, dtype=jnp.bfloat16, num_layers=2):
    nh, kvh, d = MODELS[model]
    cache = _cache(num_layers, kvh, bs, d, dtype)
    return [S((num_tokens, nh, d), dtype), cache, cache, S((batch, CONTEXT // bs), jnp.int32),
            S((batch,), jnp.int32), S((batch + 1,), jnp.int32), S((), jnp.int32)]


def _attend(q, k, v, bt, sl, qs, layer, **kw):
    return ragged_paged_attention(q, k, v, bt, sl, qs, sm_scale=0.125, layer=layer, interpret=False, **kw)


MOSAIC = jax.__version_info__ >= (0, 11)     # jax >= 0.11 lowers bf16 head_dim 64/128 with Mosaic GPU


# Expected programs, worked by hand from attention_triton's rules (H200: 132 SMs):
#   S = clamp(next_pow2(cdiv(264, B * KVH)), 1, min(64, chunks // 4)), chunks = 32768 / 64 = 512;
#   NQB = cdiv(T, TQ) + min(B, T // (TD + 1)); grid = (NQB + B * S, KVH).
#   Triton: TQ = 64 / Gp, TD = 16 / Gp. Mosaic GPU (64 rows per program): TQ = TD = 64 / Gp, and
#   S targets one program per SM (cdiv(132, B * KVH) in place of 264: its SMEM fits one);
#   its programs show in the lowered module as the queries operand [KVH, P, 64, D].
@pytest.mark.parametrize("model,bs,batch,num_tokens,grid,mosaic_programs", [
    ("llama3-8b", 16, 1, 1, (1 + 0 + 64, 8), 1 + 0 + 32),         # decode, batch 1 x 32k: 64 KV segments (Mosaic 32)
    ("llama3-8b", 32, 64, 64, (4 + 12 + 64, 8), 4 + 3 + 64),      # decode, batch 64: S = 1
    ("llama3-8b", 16, 1, 2048, (128 + 1 + 64, 8), 128 + 1 + 32),  # a 2048-token prefill chunk: 128 query blocks
    ("smollm2", 16, 64, 64, (4 + 12 + 128, 3), 4 + 3 + 64),       # Gp 4 (G = 3 padded): S = 2 (Mosaic 1)
    ("smollm2", 32, 1, 1, (1 + 0 + 64, 3), 1 + 0 + 64),
    ("d80", 16, 8, 8, (1 + 0 + 8 * 2, 32), None),                 # head_dim 80 -> 128 padded; Gp 1: TD 16, TQ 64
    ("d96", 32, 1, 300, (5 + 1 + 16, 32), None),                  # head_dim 96; S = next_pow2(cdiv(264, 32)) = 16
])
def test_attention_lowers_with_expected_programs(model, bs, batch, num_tokens, grid, mosaic_programs):
    module = export_for_cuda(_attend, *_attention_args(model, bs, batch, num_tokens))
    calls = kernel_calls(module)
    assert len(calls) == 1, module[:2000]
    nh, kvh, d = MODELS[model]
    if MOSAIC and mosaic_programs is not None:
        assert "custom_call @mosaic_gpu_v2(" in calls[0]
        assert f"tensor<{kvh}x{mosaic_programs}x64x{d}xbf16>" in operand_types(calls[0]), operand_types(calls[0])
    else:
        assert f"custom_call @{TRITON_CALL}(" in calls[0] and 'name = "ragged_paged_attention"' in calls[0]
        assert triton_grid(calls[0]) == grid + (1,)
    # the whole cache (all layers) goes into the kernel as K and V operands: no per-layer copy
    cache_type = f"tensor<2x{kvh}x{CONTEXT // bs + 1}x{bs}x{d}xbf16>"
    assert operand_types(calls[0]).count(cache_type) == 2, operand_types(calls[0])
    assert f"tensor<{kvh}x{CONTEXT // bs + 1}x{bs}x{d}xbf16>" not in module


@pytest.mark.parametrize("kernel", ["triton", "mosaic"])
def test_the_gpu_kernel_can_be_chosen(kernel, monkeypatch):
    """gpu_kernel= (or JAXPAGED_GPU_ATTENTION) picks the kernel; mosaic needs jax >= 0.11."""
    monkeypatch.setenv("JAXPAGED_GPU_ATTENTION", kernel)
    if kernel == "mosaic" and not MOSAIC:
        with pytest.raises(ValueError, match="needs jax >= 0.11"):
            gpu_kernel_choice()
    else:
        assert gpu_kernel_choice() == kernel
    args = _attention_args("llama3-8b", 16, 8, 8)
    if kernel == "mosaic" and not MOSAIC:
        with pytest.raises(ValueError, match="needs jax >= 0.11"):
            export_for_cuda(lambda *a: _attend(*a, gpu_kernel=kernel), *args)
        return
    call = kernel_calls(export_for_cuda(lambda *a: _attend(*a, gpu_kernel=kernel), *args))[0]
    assert ("mosaic_gpu" in call) == (kernel == "mosaic")


def test_decode_only_bound_launches_no_prefill_programs():
    module = export_for_cuda(lambda *a: _attend(*a, max_query_len=1, gpu_kernel="triton"),
                             *_attention_args("llama3-8b", 16, 64, 64))
    assert triton_grid(kernel_calls(module)[0]) == (64, 8, 1)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16])
def test_attention_lowers_in_other_dtypes_with_options(dtype):
    args = _attention_args("llama3-8b", 16, 4, 96, dtype=dtype)
    module = export_for_cuda(lambda *a: _attend(*a, soft_cap=30.0, sliding_window=4096), *args)
    assert len(kernel_calls(module)) == 1


@pytest.mark.parametrize("model,bs", [("llama3-8b", 16), ("d80", 32)])
def test_one_kernel_call_per_layer_and_the_cache_updated_in_place(model, bs):
    """A model step's pattern: a scan over layers writes this step's K/V (donated cache) and attends.

    The lowered module holds one write and one attention call (inside the scan body), the write's
    cache operands aliased to its outputs, and the step's cache arguments donated to its outputs."""
    nh, kvh, d = MODELS[model]
    num_layers, batch, t = 4, 64, 64
    cache = _cache(num_layers, kvh, bs, d, jnp.bfloat16, num_blocks=4096)

    def step(k, v, q, k_new, v_new, slots, bt, sl, qs):
        def layer(carry, i):
            k, v = kv_cache_write(*carry, k_new, v_new, slots, layer=i, interpret=False)
            return (k, v), _attend(q, k, v, bt, sl, qs, i)
        (k, v), outs = jax.lax.scan(layer, (k, v), jnp.arange(num_layers, dtype=jnp.int32))
        return k, v, outs

    args = [cache, cache, S((t, nh, d), jnp.bfloat16), S((t, kvh, d), jnp.bfloat16),
            S((t, kvh, d), jnp.bfloat16), S((t,), jnp.int32), S((batch, 512), jnp.int32),
            S((batch,), jnp.int32), S((batch + 1,), jnp.int32)]
    module = export_for_cuda(step, *args, donate_argnums=(0, 1))
    calls = kernel_calls(module)
    assert len(calls) == 2, calls
    write = next(line for line in calls if 'name = "kv_cache_write"' in line)
    attention = next(line for line in calls if line is not write)
    assert ("mosaic_gpu" in attention) == (MOSAIC and d in (64, 128)), attention[:300]
    assert write.count("output_operand_alias<") == 2, write[:400]
    main = next(line for line in module.splitlines() if "func.func public @main" in line)
    assert main.count("tf.aliasing_output") == 2 or main.count("jax.buffer_donor") == 2, main[:600]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("layered,num_tokens,head_dim", [(True, 64, 128), (True, 13, 80), (False, 40, 64)])
def test_kv_cache_write_lowers_for_cuda_in_place(dtype, layered, num_tokens, head_dim):
    kvh, nb, bs = 4, 64, 16
    cache = ((3,) if layered else ()) + (kvh, nb, bs, head_dim)
    args = [S(cache, dtype), S(cache, dtype), S((num_tokens, kvh, head_dim), dtype),
            S((num_tokens, kvh, head_dim), dtype), S((num_tokens,), jnp.int32)]
    if layered:
        fn = lambda k, v, kn, vn, s, layer: kv_cache_write(k, v, kn, vn, s, layer=layer, interpret=False)
        args.append(S((), jnp.int32))
    else:
        fn = lambda k, v, kn, vn, s: kv_cache_write(k, v, kn, vn, s, interpret=False)
    calls = kernel_calls(export_for_cuda(fn, *args))
    assert len(calls) == 1
    # both cache buffers are aliased to the outputs: written in place under donation
    assert calls[0].count("output_operand_alias<") == 2, calls[0][:400]
    assert 'name = "kv_cache_write"' in calls[0]


@pytest.mark.parametrize("storage,mlir", [(jnp.int8, "i8"), (jnp.float8_e4m3fn, "f8E4M3FN")])
@pytest.mark.parametrize("model,bs", [("llama3-8b", 16), ("d80", 32)])
def test_8bit_cache_step_lowers_with_scales_in_place(storage, mlir, model, bs):
    """A model step over an int8 / fp8 cache (kv_cache_dtype="int8" / "fp8"): each layer quantizes its
    new rows, writes the 8-bit rows with the Triton write and their scales with XLA's scatter, and
    attends with the Triton kernel reading 8-bit pages + f32 scales (Mosaic takes 16-bit caches only).
    The lowered module passes the whole cache (pages and scales) into one attention call, and all four
    cache arrays are donated."""
    from pallas_kernels.kv_quant import quantize_kv, write_scales
    nh, kvh, d = MODELS[model]
    num_layers, batch, t, nb = 4, 64, 64, 4096
    pages, scales = S((num_layers, kvh, nb, bs, d), storage), S((num_layers, kvh, nb, bs), jnp.float32)

    def step(k, v, ks, vs, q, k_new, v_new, slots, bt, sl, qs):
        def layer(carry, i):
            k, v, ks, vs = carry
            (kq, ksn), (vq, vsn) = quantize_kv(k_new, storage), quantize_kv(v_new, storage)
            k, v = kv_cache_write(k, v, kq, vq, slots, layer=i, interpret=False)
            ks, vs = write_scales(ks, vs, ksn, vsn, slots, layer=i)
            return (k, v, ks, vs), _attend(q, k, v, bt, sl, qs, i, k_scales=ks, v_scales=vs)
        carry, outs = jax.lax.scan(layer, (k, v, ks, vs), jnp.arange(num_layers, dtype=jnp.int32))
        return *carry, outs

    args = [pages, pages, scales, scales, S((t, nh, d), jnp.bfloat16), S((t, kvh, d), jnp.bfloat16),
            S((t, kvh, d), jnp.bfloat16), S((t,), jnp.int32), S((batch, 512), jnp.int32),
            S((batch,), jnp.int32), S((batch + 1,), jnp.int32)]
    module = export_for_cuda(step, *args, donate_argnums=(0, 1, 2, 3))
    calls = kernel_calls(module)
    assert len(calls) == 2, calls
    write = next(line for line in calls if 'name = "kv_cache_write"' in line)
    attention = next(line for line in calls if line is not write)
    assert f"custom_call @{TRITON_CALL}(" in attention and 'name = "ragged_paged_attention"' in attention
    ops = operand_types(attention)
    assert ops.count(f"tensor<{num_layers}x{kvh}x{nb}x{bs}x{d}x{mlir}>") == 2, ops
    assert ops.count(f"tensor<{num_layers}x{kvh}x{nb}x{bs}xf32>") == 2, ops
    assert write.count("output_operand_alias<") == 2, write[:400]
    main = next(line for line in module.splitlines() if "func.func public @main" in line)
    assert main.count("tf.aliasing_output") == 4 or main.count("jax.buffer_donor") == 4, main[:800]


@pytest.mark.parametrize("dtype,soft_cap,window,scales", [
    (jnp.bfloat16, None, None, False), (jnp.float32, 30.0, 37, False), (jnp.bfloat16, None, None, True)])
def test_triton_attention_module_verifies(dtype, soft_cap, window, scales, monkeypatch, capsys):
    """The Triton module the GPU compiles must pass MLIR verification. Pallas prints it with
    `debug=True`: in MLIR's custom form when it verifies, in the generic form ("scf.for"(...),
    %x = "arith...") when it does not. (jax 0.11 typed a select of two literals as i1, which made
    an scf.for's bounds mismatch: found on an H200, where the compile then failed.)"""
    from jax.experimental import pallas as pl
    from pallas_kernels.attention_triton import gpu_tiling, ragged_paged_attention_gpu

    pallas_call = pl.pallas_call
    monkeypatch.setattr(pl, "pallas_call", lambda *a, **k: pallas_call(*a, **{**k, "debug": True}))
    t = gpu_tiling(8, 2, 64, 4, 256)
    cache = S((1, 2, 17, 16, 64), jnp.int8 if scales else dtype)
    args = [S((64, 8, 64), dtype), cache, cache, S((4, 16), jnp.int32), S((4,), jnp.int32), S((5,), jnp.int32),
            S((1,), jnp.int32)] + [S((1, 2, 17, 16), jnp.float32)] * (2 if scales else 0)
    export_for_cuda(lambda *a: ragged_paged_attention_gpu(*a, sm_scale=0.125, soft_cap=soft_cap, window=window,
                                                          t=t, interpret=False), *args)
    out = capsys.readouterr().out
    assert "The Triton module for pallas_call" in out
    generic = [line for line in out.splitlines() if '"scf.for"' in line or '= "arith.' in line]
    assert not generic, generic[:3]
