"""The KV cache's dtype names (EngineConfig.kv_cache_dtype, vLLM's --kv-cache-dtype) and the bytes a
block of each costs. No jax here: the config checks the name where it enters.

  "auto"                 the attention backend's choice for the model's dtype (jaxpaged/backends)
  "float32", "bfloat16"  float pages
  "int8", "fp8_e4m3"     8-bit pages quantized per (token, KV head) at write, one f32 scale per row
                         (pallas_kernels/kv_quant.py); "fp8" names e4m3 (vLLM's default fp8 format)
"""
from __future__ import annotations

FLOAT_KV_DTYPES = ("float32", "bfloat16")
QUANTIZED_KV_DTYPES = ("int8", "fp8_e4m3")
KV_CACHE_DTYPES = ("auto", *FLOAT_KV_DTYPES, *QUANTIZED_KV_DTYPES)
_ALIASES = {"fp8": "fp8_e4m3", "fp8_e4m3fn": "fp8_e4m3", "float8_e4m3fn": "fp8_e4m3", "fp32": "float32",
            "f32": "float32", "bf16": "bfloat16"}
SCALE_BYTES = 4          # one f32 scale per (token, KV head) row, for K and for V


def check_kv_cache_dtype(name) -> str:
    """EngineConfig.kv_cache_dtype -> its canonical name; ValueError naming the field otherwise."""
    key = str(getattr(name, "__name__", name)).lower()
    key = _ALIASES.get(key, key)
    if key not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype: expected one of {list(KV_CACHE_DTYPE_CHOICES)}, "
                         f"got {name!r}")
    return key


def is_quantized(name: str) -> bool:
    return name in QUANTIZED_KV_DTYPES


def kv_bytes_per_block(cfg, block_size: int, dtype: str) -> int:
    """Bytes of one KV block over all layers, K and V (scales included). dtype: a canonical KV dtype
    name other than "auto". One row (token, KV head) costs 4D bytes (f32), 2D (bf16), D + 4 (8-bit)."""
    per_row = {"float32": 4 * cfg.head_dim, "bfloat16": 2 * cfg.head_dim}.get(dtype, cfg.head_dim + SCALE_BYTES)
    return 2 * cfg.num_layers * cfg.num_kv_heads * block_size * per_row


# what a command line offers (--kv-cache-dtype): the names plus vLLM's "fp8"
KV_CACHE_DTYPE_CHOICES = ("auto", *FLOAT_KV_DTYPES, "int8", "fp8", "fp8_e4m3")
