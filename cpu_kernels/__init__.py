"""cpu_kernels: native (C++, XLA FFI) kernels for XLA:CPU, the CPU twins of pallas_kernels."""
from cpu_kernels.build import NativeBuildError, available
from cpu_kernels.ragged_paged_attention import ragged_paged_attention_cpu

__all__ = ["NativeBuildError", "available", "ragged_paged_attention_cpu"]
