"""The Pallas backend: pallas_kernels' cache write and ragged paged attention (compiled for GPU/TPU,
interpret mode on CPU), and on GPU the quantized-weight matmuls (pallas_kernels/int8_matmul.py,
gguf_matmul.py).

Quantized weights on one GPU: every stacked int8 weight (quantization="int8", Int8Weight) becomes a
`PallasInt8` at load (padded once to the kernel's blocks), every stacked GGUF block weight
(quantization="gguf") a `PallasBlocks`; both are read at their layer in place by the Triton kernels.
Elsewhere they keep their jnp matmuls (XLA's dot): on CPU the kernels would run in interpret mode, far
slower than the dot; on TPU they are Triton-only. JAXPAGED_PALLAS_MATMUL=on forces the kernels anywhere
(interpret mode off GPU: how the engine tests run them on CPU), =off keeps XLA's dot on GPU.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import jax

from jaxpaged.backends.base import Backend
from jaxpaged.gguf_blocks import KernelBlocks
from jaxpaged.weights import Weight

MATMUL_ENV = "JAXPAGED_PALLAS_MATMUL"
# steps of more rows (prefill chunks) dequantize a GGUF layer and run XLA's dot (as backends.native; unmeasured on GPU)
BLOCK_KERNEL_MAX_ROWS = 64


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class PallasInt8(Weight):
    """A stacked int8 weight (quantization.Int8Weight) in pallas_kernels.int8_matmul's form: q and the
    scales zero-padded to the kernel's blocks. Not sliced by the layer scan: the kernel reads its
    layer of the stacked array in place (a slice handed to a custom call is a copy)."""
    q: jax.Array                       # [L, Kp, Np] int8 (Kp, Np: K, N padded to int8_matmul.PAD)
    scale: jax.Array                   # [L, Np] f32 (0 in padded columns)
    layer: jax.Array | None = None     # int32 scalar inside the layer scan
    k: int = field(default=0, metadata=dict(static=True))
    n: int = field(default=0, metadata=dict(static=True))
    sliced_by_scan = False

    @classmethod
    def of(cls, w) -> "PallasInt8":
        from pallas_kernels.int8_matmul import pad_weight
        q, scale = pad_weight(w.q, w.scale)
        return cls(q, scale, None, w.q.shape[-2], w.q.shape[-1])

    def matmul(self, x, rows=None):
        from pallas_kernels.int8_matmul import int8_matmul
        return int8_matmul(x, self.q, self.scale, self.layer, n=self.n)

    def at_layer(self, layer, rows=None) -> "PallasInt8":
        return PallasInt8(self.q, self.scale, layer, self.k, self.n)

    def value(self):
        q, s = (self.q, self.scale) if self.layer is None else (self.q[self.layer], self.scale[self.layer])
        return q[..., :self.k, :self.n].astype(s.dtype) * s[..., None, :self.n]

    @property
    def shape(self):
        return (*self.q.shape[:-2], self.k, self.n)

    def nbytes(self) -> int:
        return self.q.size + 4 * self.scale.size


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class PallasBlocks(KernelBlocks):
    """Stacked GGUF blocks (gguf_blocks.GGUFBlocks [L, N, row_bytes]) multiplied by pallas_kernels'
    gguf_matmul, which decodes each block in registers, for steps of up to BLOCK_KERNEL_MAX_ROWS rows."""
    blocks: object                     # gguf_blocks.GGUFBlocks, stacked
    layer: jax.Array | None = None
    kernel_max_rows = BLOCK_KERNEL_MAX_ROWS

    def at_layer(self, layer, rows=None) -> "PallasBlocks":
        return PallasBlocks(self.blocks, layer)

    def _kernel(self, x, rows):
        from pallas_kernels.gguf_matmul import gguf_matmul
        return gguf_matmul(x, self.blocks.data, self.layer, qtype=self.blocks.qtype)


def matmul_mode() -> str:
    """JAXPAGED_PALLAS_MATMUL: "auto" (default: the quantized-weight kernels on GPU), "on" or "off"."""
    mode = os.environ.get(MATMUL_ENV, "auto").strip().lower() or "auto"
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"{MATMUL_ENV}: expected 'auto', 'on' or 'off', got {mode!r}")
    return mode


def _kernels_here(mesh) -> bool:
    """On one device: on GPU (mode "auto"), or anywhere with mode "on" (interpret mode off GPU)."""
    mode = matmul_mode()
    return mesh is None and (mode == "on" or (mode == "auto" and jax.default_backend() == "gpu"))


class PallasBackend(Backend):
    name = "pallas"

    def int8_kernel(self, mesh) -> bool:
        return _kernels_here(mesh)

    def int8_weight(self, w) -> PallasInt8:
        return PallasInt8.of(w)

    def reads_blocks(self, mesh) -> bool:
        return _kernels_here(mesh)

    def blocks(self, w) -> PallasBlocks:
        return PallasBlocks(w)

    def _write_fn(self):
        from pallas_kernels import kv_cache_write
        return kv_cache_write

    def _attend_fn(self):
        from pallas_kernels import ragged_paged_attention
        return ragged_paged_attention
