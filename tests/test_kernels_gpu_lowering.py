"""The Pallas kernels lower for CUDA (Triton backend) on a machine with no GPU.

`jax.export` for platform "cuda" runs Pallas' Triton lowering, which builds the Triton
IR at export time: a kernel using something the GPU backend cannot do fails here.
(Compiling that IR to PTX, e.g. tl.dot's >= 16 sizes, only happens on a GPU:
tests/test_kernels_gpu.py.)
"""
from __future__ import annotations

import re

import pytest

import jax
import jax.numpy as jnp
from jax import export

from pallas_kernels import kv_cache_write, ragged_paged_attention

TRITON = "__gpu$xla.gpu.triton"
UNCHECKED = [export.DisabledSafetyCheck.custom_call(TRITON)]
S = jax.ShapeDtypeStruct


def _export(fn, *args):
    return export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=UNCHECKED)(*args).mlir_module()


def _triton_calls(module: str) -> list[str]:
    return [line for line in module.splitlines() if f"custom_call @{TRITON}" in line]


def _operand_types(call_line: str) -> list[str]:
    """Operand types of a custom_call line: its trailing `: (t1, t2, ...) -> result`."""
    sig = call_line[call_line.rindex("} : (") + 5:call_line.rindex(") -> ")]
    return re.findall(r"tensor<[^>]*>", sig)


# head_dim 64/128, block sizes 8/16/32, GQA 1/3/8 (3 -> group padded to 4, rows >= 16)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("layered,num_heads,num_kv_heads,head_dim,block_size,opts", [
    (True, 12, 4, 64, 8, {}),
    (True, 8, 1, 128, 16, dict(soft_cap=30.0, sliding_window=64)),
    (False, 4, 4, 64, 32, {}),
])
def test_ragged_paged_attention_lowers_for_cuda(dtype, layered, num_heads, num_kv_heads, head_dim,
                                                block_size, opts):
    t, b, w, nb, num_layers = 96, 8, 16, 64, 3
    cache = ((num_layers,) if layered else ()) + (num_kv_heads, nb, block_size, head_dim)
    args = [S((t, num_heads, head_dim), dtype), S(cache, dtype), S(cache, dtype),
            S((b, w), jnp.int32), S((b,), jnp.int32), S((b + 1,), jnp.int32)]
    if layered:
        fn = lambda q, k, v, bt, sl, qs, layer: ragged_paged_attention(
            q, k, v, bt, sl, qs, sm_scale=0.125, layer=layer, interpret=False, **opts)
        args.append(S((), jnp.int32))
    else:
        fn = lambda q, k, v, bt, sl, qs: ragged_paged_attention(
            q, k, v, bt, sl, qs, sm_scale=0.125, interpret=False, **opts)
    module = _export(fn, *args)
    calls = _triton_calls(module)
    assert len(calls) == 1, module[:2000]
    # the whole cache (all layers) goes into the kernel as K and V operands: no per-layer copy
    elem = "bf16" if dtype == jnp.bfloat16 else "f32"
    cache_type = f"tensor<{'x'.join(map(str, (num_layers if layered else 1,) + cache[-4:]))}x{elem}>"
    assert _operand_types(calls[0]).count(cache_type) == 2, _operand_types(calls[0])
    if layered:   # and no op anywhere makes a one-layer [KVH, NB, BS, D] tensor
        assert f"tensor<{'x'.join(map(str, cache[-4:]))}x{elem}>" not in module
    assert 'name = "ragged_paged_attention"' in calls[0]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("layered,num_tokens", [(True, 64), (True, 13), (False, 40)])
def test_kv_cache_write_lowers_for_cuda_in_place(dtype, layered, num_tokens):
    kvh, nb, bs, d = 4, 64, 16, 128
    cache = ((3,) if layered else ()) + (kvh, nb, bs, d)
    args = [S(cache, dtype), S(cache, dtype), S((num_tokens, kvh, d), dtype),
            S((num_tokens, kvh, d), dtype), S((num_tokens,), jnp.int32)]
    if layered:
        fn = lambda k, v, kn, vn, s, layer: kv_cache_write(k, v, kn, vn, s, layer=layer, interpret=False)
        args.append(S((), jnp.int32))
    else:
        fn = lambda k, v, kn, vn, s: kv_cache_write(k, v, kn, vn, s, interpret=False)
    module = _export(fn, *args)
    calls = _triton_calls(module)
    assert len(calls) == 1, module[:2000]
    # both cache buffers are aliased to the outputs: written in place under donation
    assert calls[0].count("output_operand_alias<") == 2, calls[0][:400]
    assert 'name = "kv_cache_write"' in calls[0]
