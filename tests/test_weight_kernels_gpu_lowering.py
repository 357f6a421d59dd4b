"""The Pallas quantized-weight matmuls (int8 weights; GGUF Q8_0/Q4_0/Q4_1 blocks) lower for CUDA
(Triton) on a machine with no GPU, at real model shapes.

`jax.export` for "cuda" builds the Triton IR at export time (pallas_kernels/lowering.py), so a kernel
the Triton backend cannot express fails here. Triton is the Pallas GPU backend of the jax 0.10
line this suite runs on; CI's jax 0.11+ step (.ci/run) runs only the attention lowering files, not this one.
Compiled and run on a GPU: tests/test_kernels_gpu.py::test_int8_matmul_on_gpu / test_gguf_matmul_on_gpu.
"""
from __future__ import annotations

import pytest

import jax
import jax.numpy as jnp

from jaxpaged.backends.pallas import PallasInt8
from pallas_kernels.gguf_matmul import BLOCK_BYTES, gguf_matmul
from pallas_kernels.int8_matmul import int8_matmul
from pallas_kernels.lowering import TRITON_CALL, export_for_cuda, kernel_calls, operand_types, triton_grid

S = jax.ShapeDtypeStruct


def _matmul(x, q, scale, layer):
    return int8_matmul(x, q, scale, layer, interpret=False)


# Expected programs, by int8_tiling's rules: BM = 16 (M <= 16) or 64; BN = 128 for M > 64 where Np
# divides, else 64; grid = (Mp / BM, Np / BN).
@pytest.mark.parametrize("layers,k,n,m,grid", [
    (30, 576, 1536, 16, (1, 24)),          # SmolLM2-135M gate/up, decode
    (30, 576, 1536, 512, (8, 12)),         # ... a 512-token prefill chunk
    (30, 1536, 576, 16, (1, 9)),           # SmolLM2 down_proj
    (30, 1536, 576, 512, (8, 9)),          # N = 576 is no multiple of 128: BN 64
    (32, 4096, 14336, 16, (1, 224)),       # Llama-3-8B gate/up
    (32, 4096, 14336, 512, (8, 112)),
])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_int8_matmul_lowers_with_expected_grid(layers, k, n, m, grid, dtype):
    module = export_for_cuda(_matmul, S((m, k), dtype), S((layers, k, n), jnp.int8),
                             S((layers, n), jnp.float32), S((), jnp.int32))
    calls = kernel_calls(module)
    assert len(calls) == 1, module[:2000]
    assert f"custom_call @{TRITON_CALL}(" in calls[0] and 'name = "int8_matmul"' in calls[0]
    assert triton_grid(calls[0]) == (*grid, 1)
    ops = operand_types(calls[0])
    xdt = "bf16" if dtype == jnp.bfloat16 else "f32"
    # the whole int8 stack goes in as is (no widened or per-layer copy); x padded to a block of rows
    assert ops == ["tensor<1xi32>", f"tensor<{m}x{k}x{xdt}>", f"tensor<{layers}x{k}x{n}xi8>",
                   f"tensor<{layers}x{n}xf32>"], ops
    assert f"tensor<{k}x{n}xi8>" not in module and f"tensor<{layers}x{k}x{n}x{xdt}>" not in module


def test_layer_scan_hands_the_kernel_the_whole_stack(monkeypatch):
    """PallasInt8 inside a layer scan (sliced_by_scan False): one kernel call per step, on the stacked
    int8 array, with no per-layer slice of it in the module."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")     # the weight's matmul picks Triton as on a GPU
    layers, h = 4, 576

    def forward(x, q, scale):
        w = PallasInt8(q, scale, None, h, h)
        step = lambda y, l: (w.at_layer(l).matmul(y).astype(y.dtype), None)
        return jax.lax.scan(step, x, jnp.arange(layers, dtype=jnp.int32))[0]

    module = export_for_cuda(forward, S((16, h), jnp.bfloat16), S((layers, h, h), jnp.int8), S((layers, h), jnp.float32))
    calls = kernel_calls(module)
    assert len(calls) == 1 and f"tensor<{layers}x{h}x{h}xi8>" in operand_types(calls[0])
    assert f"tensor<{h}x{h}xi8>" not in module


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1"])
@pytest.mark.parametrize("layers,k,n,m,grid", [
    (30, 576, 1536, 16, (1, 24)),          # SmolLM2 gate/up, decode (BM 16, BN 64)
    (30, 1536, 576, 64, (1, 9)),           # SmolLM2 down_proj, 64 rows (the kernel's largest step)
    (32, 4096, 14336, 16, (1, 224)),       # Llama-3-8B gate/up
])
def test_gguf_matmul_lowers_with_expected_grid(qtype, layers, k, n, m, grid):
    row_bytes = k // 32 * BLOCK_BYTES[qtype]
    module = export_for_cuda(lambda x, d, l: gguf_matmul(x, d, l, qtype=qtype, interpret=False),
                             S((m, k), jnp.bfloat16), S((layers, n, row_bytes), jnp.uint8), S((), jnp.int32))
    calls = kernel_calls(module)
    assert len(calls) == 1, module[:2000]
    assert f'name = "gguf_matmul_{qtype.lower()}"' in calls[0] and triton_grid(calls[0]) == (*grid, 1)
    # the file's block bytes go in whole (all layers), never a dequantized [N, K] float array
    assert operand_types(calls[0]) == ["tensor<1xi32>", f"tensor<{m}x{k}xf32>",
                                       f"tensor<{layers}x{n}x{row_bytes}xui8>"], operand_types(calls[0])
    assert f"{n}x{k}xf32" not in module and f"{k}x{n}xf32" not in module
