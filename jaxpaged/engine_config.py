"""EngineConfig: every engine knob in one frozen dataclass; LLM(...) args and server flags come from its fields."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from jaxpaged.config import check_dtype
from jaxpaged.generation_config import check_generation_config
from jaxpaged.spec_decode.config import SpeculativeConfig
from jaxpaged.kv_dtypes import check_kv_cache_dtype

DEFAULT_MODEL = "smollm2-135m-instruct"
ATTENTION_BACKENDS = ("auto", "native", "pallas", "jnp")
QUANTIZATION_SCHEMES = ("int8", "gguf")


@dataclass(frozen=True)
class EngineConfig:
    """Engine configuration. Field names match vLLM's engine args where vLLM has one.

    KV pool size (kv_sizing.py): `num_kv_blocks` when given, else `kv_cache_memory_bytes` / bytes per block,
    else `gpu_memory_utilization` x device memory less the params, else enough blocks for `max_num_seqs`
    sequences of `max_model_len` tokens, capped at 2 GiB. `max_model_len` defaults to the model's length
    when the pool holds a sequence that long, else to what it holds (logged).
    """
    model: str = DEFAULT_MODEL
    tokenizer: str | None = None          # default: the model's own tokenizer
    dtype: str = "float32"
    max_model_len: int | None = None      # default: the model's max positions, if the KV pool holds that many
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory_bytes: int | None = None
    # fraction of the device's memory (CPU: the machine's RAM) for params + KV pool; see kv_sizing.py
    gpu_memory_utilization: float | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    enable_prefix_caching: bool = True
    seed: int = 0
    max_logprobs: int = 20
    tensor_parallel_size: int = 1
    download_dir: str | None = None       # the converted-params cache (default ~/.cache/jaxpaged or $JAXPAGED_CACHE)
    compilation_cache_dir: str | None = None  # JAX persistent compilation cache (default <cache>/xla)
    enforce_eager: bool = False           # skip warmup(); shapes still come from the bucket table
    # "auto": "native" (cpu_kernels, C++) on CPU when it builds, else "pallas"; "jnp": the references
    attention_backend: str = "auto"
    # with the native backend: weight matmuls through cpu_kernels/matmul (weights packed at load) where
    # this CPU has the instructions for the dtype (AVX-512 f32, AMX bf16); with Pallas on GPU: int8 / GGUF
    # weights through its Triton kernels (backends/pallas.py); False: XLA's dot
    native_matmul: bool = True
    # "auto": what the attention backend prefers for the model's dtype (jaxpaged/backends); "float32",
    # "bfloat16"; "int8" or "fp8" (= "fp8_e4m3"): K/V quantized at write with a scale per (token, KV head),
    # D + 4 bytes a row instead of 2D (bf16) / 4D (f32), so ~2x / ~4x the blocks (jaxpaged/kv_dtypes.py)
    kv_cache_dtype: str = "auto"
    # weight quantization of every decoder Linear: None; "int8" (weight-only, per output channel,
    # jaxpaged/quantization.py); "gguf" (a .gguf file's Q8_0/Q4_0/Q4_1 blocks kept as they are,
    # jaxpaged/gguf_blocks.py). The LM head and embedding stay in the model's dtype.
    quantization: str | None = None
    # default sampling parameters: "auto" = the model's generation_config.json (vLLM's default), "vllm" = none,
    # or a folder holding a generation_config.json (see generation_config.py)
    generation_config: str = "auto"
    # multi-LoRA serving (jaxpaged/lora): adapters per request (LoRARequest), `max_loras` of them in
    # device slots at once (more wait), ranks padded to `max_lora_rank`
    enable_lora: bool = False
    max_loras: int = 1
    max_lora_rank: int = 16
    # speculative decoding (vLLM's dict, or its JSON text): {"method": "ngram", "num_speculative_tokens": k,
    # "prompt_lookup_max": a, "prompt_lookup_min": b} or {"model": ..., "num_speculative_tokens": k};
    # stored parsed (spec_decode/config.py); None: off
    speculative_config: dict | SpeculativeConfig | None = None

    def __post_init__(self):
        object.__setattr__(self, "dtype", check_dtype(self.dtype))
        if self.quantization in ("none", "None", ""):
            object.__setattr__(self, "quantization", None)
        if self.quantization is not None and self.quantization not in QUANTIZATION_SCHEMES:
            raise ValueError(f"quantization: expected one of {list(QUANTIZATION_SCHEMES)} or None, "
                             f"got {self.quantization!r}")
        if self.quantization == "gguf" and int(self.tensor_parallel_size) > 1:
            raise ValueError("quantization: 'gguf' blocks run on one device; use tensor_parallel_size=1 "
                             "or quantization='int8'")
        object.__setattr__(self, "kv_cache_dtype", check_kv_cache_dtype(self.kv_cache_dtype))
        check_generation_config(self.generation_config)
        object.__setattr__(self, "speculative_config", SpeculativeConfig.parse(self.speculative_config))
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend: expected one of {list(ATTENTION_BACKENDS)}, "
                             f"got {self.attention_backend!r}")
        if self.block_size not in (8, 16, 32):
            raise ValueError(f"block_size: expected one of [8, 16, 32], got {self.block_size}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "tensor_parallel_size", "max_logprobs",
                     "max_loras", "max_lora_rank"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len: must be >= 1, got {self.max_model_len}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 2:
            raise ValueError(f"num_kv_blocks: must be >= 2 (block 0 is reserved), got {self.num_kv_blocks}")
        if self.gpu_memory_utilization is not None and not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization: must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes <= 0:
            raise ValueError(f"kv_cache_memory_bytes: must be > 0, got {self.kv_cache_memory_bytes}")

    def replace(self, **changes) -> "EngineConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]
