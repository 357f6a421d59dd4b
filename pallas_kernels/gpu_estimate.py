"""Paper estimates of the GPU attention kernel (attention_triton) per batch shape: programs, loop
iterations, bytes moved and the time HBM bandwidth alone would allow.

Used by docs/ARCHITECTURE.md's table (`python -m pallas_kernels.gpu_estimate`) and by
`python -m jaxpaged.bench gpu-check`, which divides these bytes by measured times (% of HBM peak).
"""
from __future__ import annotations

import dataclasses

from pallas_kernels.attention_triton import DEFAULT_NUM_SMS, gpu_tiling, num_prefill_blocks

HBM_PEAK_GBPS = {"H200": 4800.0, "H100": 3350.0, "GH200": 4000.0, "A100": 2039.0, "L40S": 864.0,
                 "L4": 300.0, "B200": 8000.0}
MODELS = {"smollm2-135m": (9, 3, 64), "llama3-8b": (32, 8, 128), "phi2-d80": (32, 32, 80)}


def hbm_peak_gbps(device_kind: str) -> float | None:
    """Datasheet HBM bandwidth of a device kind ("NVIDIA H200" -> 4800 GB/s), None if unknown."""
    for name in sorted(HBM_PEAK_GBPS, key=len, reverse=True):
        if name in device_kind:
            return HBM_PEAK_GBPS[name]
    return None


@dataclasses.dataclass(frozen=True)
class Estimate:
    programs: int          # grid size: (NQB + B * S) * KVH
    kv_splits: int         # S
    iterations: int        # KV chunks walked by the longest program
    kv_bytes: int          # K + V bytes the attention must read (each position once per KV head)
    bytes: int             # kv_bytes + q, outputs, decode partials (written and read back)
    flops: int             # 4 * query rows * visible keys * D (QK^T and PV)

    def ideal_us(self, peak_gbps: float) -> float:
        return self.bytes / peak_gbps / 1e3


def estimate(q_lens, ctx_lens, *, num_heads, num_kv_heads, head_dim, block_size=16, itemsize=2,
             width=None, num_sms=DEFAULT_NUM_SMS) -> Estimate:
    """q_lens[b] new tokens on top of ctx_lens[b] - q_lens[b] cached ones; width: table width (pages)."""
    batch, tokens = len(q_lens), sum(q_lens)
    width = width or -(-max(ctx_lens) // block_size)
    t = gpu_tiling(num_heads, num_kv_heads, head_dim, batch, width * block_size, num_sms)
    nqb = num_prefill_blocks(tokens, batch, t)
    g = num_heads // num_kv_heads
    kv_bytes = 2 * sum(ctx_lens) * num_kv_heads * head_dim * itemsize
    iters, flops = 0, 0
    for ql, ctx in zip(q_lens, ctx_lens):
        chunks = -(-ctx // t.kv_chunk)
        if ql <= t.decode_tokens:
            iters = max(iters, -(-chunks // t.kv_splits))
        else:   # the last query block sees the whole context
            iters = max(iters, chunks)
        seen = sum(ctx - ql + i + 1 for i in range(ql))   # causal keys over the sequence's queries
        flops += 4 * seen * num_heads * head_dim
    part = batch * t.kv_splits * t.decode_tokens * t.group * num_kv_heads * (t.head_dim + 2) * 4
    io = 2 * tokens * num_heads * head_dim * itemsize + 2 * part
    return Estimate(programs=(nqb + batch * t.kv_splits) * num_kv_heads, kv_splits=t.kv_splits,
                    iterations=iters, kv_bytes=kv_bytes, bytes=kv_bytes + io, flops=flops)


def decode_case(batch: int, context: int):
    return (1,) * batch, (context,) * batch


def prefill_case(chunk: int, context: int):
    return (chunk,), (context,)


def table(peak_gbps: float = HBM_PEAK_GBPS["H200"]) -> str:
    """The markdown table of docs/ARCHITECTURE.md (bf16, block 16, H200)."""
    lines = ["| model | case | programs | S | iterations | KV MB | total MB | ideal us (HBM) |",
             "|---|---|---|---|---|---|---|---|"]
    for model, (nh, kvh, d) in MODELS.items():
        cases = [(f"decode B={b} ctx={c // 1024}k", decode_case(b, c)) for b in (1, 8, 64) for c in (1024, 8192, 32768)]
        cases += [("prefill 2048 @ ctx 2k", prefill_case(2048, 2048)), ("prefill 2048 @ ctx 8k", prefill_case(2048, 8192))]
        for name, (ql, cl) in cases:
            e = estimate(ql, cl, num_heads=nh, num_kv_heads=kvh, head_dim=d)
            lines.append(f"| {model} | {name} | {e.programs} | {e.kv_splits} | {e.iterations} | "
                         f"{e.kv_bytes / 1e6:.1f} | {e.bytes / 1e6:.1f} | {e.ideal_us(peak_gbps):.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
