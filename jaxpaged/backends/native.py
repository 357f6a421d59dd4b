"""The native CPU backend (cpu_kernels/, C++ through XLA FFI, built at first use).

Storage it chooses: a bf16 KV cache is held as its uint16 bit patterns (XLA:CPU scatters uint16
rows in place; a bf16 scatter is widened to f32 around the whole cache), which the attention
kernel reads as bf16 (an fp8 one as uint8 e4m3 bits, the same way); "auto" keeps the model's dtype.
An int8 / fp8 cache is read by the kernel's 8-bit path (rows times their scales). Weight matmuls run
on weights packed once at load (`Packed`: AVX-512 / AVX2 f32 panels, AMX bf16 tiles; `PackedInt8`: int8
panels with their scales, quantization="int8") where this CPU has the instructions for the dtype and the
engine runs on one device (`packs_weights`); XLA's dot elsewhere (e.g. under tensor parallelism).
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from jaxpaged.backends.base import Backend
from jaxpaged.backends.kv_storage import QuantizedPages, attend_args, write_quantized
from jaxpaged.gguf_blocks import KernelBlocks
from jaxpaged.weights import Weight


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Packed(Weight):
    """A weight [K, N] (or stacked [L, K, N]) in cpu_kernels/matmul's packed layout. Not sliced by
    the layer scan: the kernel reads its layer of the stacked array in place."""
    packed: object           # cpu_kernels.matmul.PackedWeight
    sliced_by_scan = False

    def matmul(self, x, rows=None):
        from cpu_kernels.matmul import packed_matmul
        w = self.packed if rows is None else self.packed.with_rows(rows)
        return packed_matmul(x, w)

    def at_layer(self, layer, rows=None) -> "Packed":
        return Packed(self.packed.at_layer(layer, rows))


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class PackedInt8(Weight):
    """An int8 weight (quantization.Int8Weight: q [(L,) K, N] + per-column scales) in cpu_kernels/
    int8_matmul's packed layout (scales inside each panel). Not sliced by the layer scan: the kernel
    reads its layer of the stacked array in place and widens the int8 panels in registers."""
    packed: object           # cpu_kernels.int8_matmul.PackedInt8Weight
    sliced_by_scan = False

    def matmul(self, x, rows=None):
        from cpu_kernels.int8_matmul import int8_matmul
        w = self.packed if rows is None else self.packed.with_rows(rows)
        return int8_matmul(x, w)

    def at_layer(self, layer, rows=None) -> "PackedInt8":
        return PackedInt8(self.packed.at_layer(layer, rows))

    @property
    def shape(self):
        return (*self.packed.data.shape[:-2], self.packed.k, self.packed.n)

    def nbytes(self) -> int:
        return int(self.packed.data.size)          # int8 values + 4 bytes of scale per (padded) column


# steps of at most this many rows (decodes, small batches) read GGUF blocks with the native kernel;
# longer ones (prefill chunks) dequantize the layer once and run XLA's dot (its blocked GEMM wins there).
# Checked with `bench matmul --quantized Q4_1,Q8_0` on SmolLM2's shapes (AVX2 EPYC, two runs, loaded
# machine: indicative): summed over a layer's q/o, gate/up and down, the block kernel took 0.80-0.92x
# of the jnp path's time at 64 rows and 1.0-1.6x at 128; per shape it wins longest where K = 576 (its
# 8 dequantized rows stay in L1) and loses from 32 rows on for down_proj (K = 1536: 48 KB of rows).
BLOCK_KERNEL_MAX_ROWS = 64


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class NativeBlocks(KernelBlocks):
    """GGUF blocks (gguf_blocks.GGUFBlocks, stacked [L, N, RB]) multiplied by cpu_kernels' block
    matmul for steps of up to BLOCK_KERNEL_MAX_ROWS rows: the blocks are never expanded to an f32
    [N, K] array for few-row steps."""
    blocks: object                     # gguf_blocks.GGUFBlocks, stacked
    layer: jax.Array | None = None
    rows: jax.Array | None = None
    kernel_max_rows = BLOCK_KERNEL_MAX_ROWS

    def at_layer(self, layer, rows=None) -> "NativeBlocks":
        return NativeBlocks(self.blocks, layer, rows)

    def _kernel(self, x, rows):
        from cpu_kernels.gguf_matmul import gguf_matmul
        rows = self.rows if rows is None else rows
        return gguf_matmul(x, self.blocks.data, qtype=self.blocks.qtype, layer=self.layer, rows=rows)


class NativeBackend(Backend):
    name = "native"

    def ready(self) -> None:
        from cpu_kernels.build import load
        load()

    def prepare(self) -> None:
        from cpu_kernels.build import build_in_background
        build_in_background()

    def default_kv_dtype(self, model_dtype: str, platform: str) -> str:
        return model_dtype

    def kv_storage_dtype(self, name: str):
        return jnp.uint16 if name == "bfloat16" else super().kv_storage_dtype(name)

    def packs_weights(self, dtype: str, mesh) -> bool:
        from cpu_kernels.matmul import worthwhile
        return mesh is None and worthwhile(jnp.dtype(dtype))

    def reads_blocks(self, mesh) -> bool:
        """GGUF blocks (quantization="gguf", one device) go to the native block matmul (NativeBlocks)."""
        return mesh is None

    def blocks(self, w) -> NativeBlocks:
        return NativeBlocks(w)

    def pack(self, w, *, stacked: bool) -> Packed | PackedInt8:
        """A dense weight -> Packed; an int8 one (quantization.Int8Weight) -> PackedInt8."""
        from jaxpaged.quantization import Int8Weight
        if isinstance(w, Int8Weight):
            from cpu_kernels.int8_matmul import pack_int8
            return PackedInt8(pack_int8(jax.device_get(w.q), jax.device_get(w.scale), stacked=stacked))
        from cpu_kernels.matmul import pack
        return Packed(pack(w, stacked=stacked))

    def pack_flavour(self, dtype: str, quantization: str | None = None) -> str:
        """The key of this machine's packed layout for weights of `dtype` (convert/packed_cache.py), and
        with int8 weights of the int8 kernel's layout too."""
        from cpu_kernels.matmul import flavour
        if quantization == "int8":
            from cpu_kernels.int8_matmul import PACK_FORMAT
            return f"{flavour(dtype)}-int8p{PACK_FORMAT}"
        return flavour(dtype)

    def packed_to_stored(self, p: Packed | PackedInt8):
        """(numpy array, meta) to cache a packed weight; `packed_from_stored` inverts it."""
        meta = {"k": p.packed.k, "n": p.packed.n}
        if isinstance(p, PackedInt8):
            meta["int8"] = True
        return jax.device_get(p.packed.data), meta

    def packed_from_stored(self, array, meta) -> Packed | PackedInt8:
        if meta.get("int8"):
            from cpu_kernels.int8_matmul import PackedInt8Weight
            return PackedInt8(PackedInt8Weight(jnp.asarray(array), None, None, int(meta["k"]), int(meta["n"])))
        from cpu_kernels.matmul import PackedWeight
        return Packed(PackedWeight(jnp.asarray(array), None, None, int(meta["k"]), int(meta["n"])))

    def lora_matmul(self, y, x, a, b, ranks, slots, layer, rows=None):
        """The native multi-LoRA kernel (cpu_kernels/lora_matmul.cc: only the slots the rows use, at
        their own ranks, stacks read in place) for f32 stacks on one device; the reference otherwise."""
        if a.dtype != jnp.float32 or b.dtype != jnp.float32:
            return super().lora_matmul(y, x, a, b, ranks, slots, layer, rows)
        from cpu_kernels.lora_matmul import lora_matmul
        return lora_matmul(y, x, a, b, slots, ranks, layer=layer, rows=rows)

    def write_kv(self, k, v, kv_cache, layer, meta):
        # XLA's row scatter (the interpreted Pallas write is element-wise, ~10x slower on CPU)
        from pallas_kernels import kv_cache_write_reference
        k_pages, v_pages = kv_cache
        if isinstance(k_pages, QuantizedPages):
            return write_quantized(kv_cache_write_reference, k, v, kv_cache, layer, meta)
        return kv_cache_write_reference(k_pages, v_pages, _to_storage(k, k_pages.dtype),
                                        _to_storage(v, v_pages.dtype), meta.slot_mapping, layer=layer)

    def attend(self, q, kv_cache, layer, meta, opts):
        from cpu_kernels import ragged_paged_attention_cpu
        k_pages, v_pages, scales = attend_args(kv_cache)
        if not scales:       # an int8 / fp8 cache takes q in any float dtype
            q = q.astype(jnp.bfloat16 if k_pages.dtype == jnp.uint16 else k_pages.dtype)
        return ragged_paged_attention_cpu(q, k_pages, v_pages, meta.block_tables, meta.seq_lens,
                                          meta.query_start, sm_scale=opts.sm_scale,
                                          sliding_window=opts.sliding_window, layer=layer, **scales)


def _to_storage(x, storage_dtype):
    """New K or V rows in the cache's storage dtype (uint16 = bf16 bit patterns)."""
    if storage_dtype == jnp.uint16:
        return jax.lax.bitcast_convert_type(x.astype(jnp.bfloat16), jnp.uint16)
    return x.astype(storage_dtype)
