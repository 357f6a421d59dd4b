"""The native packed weight matmul (cpu_kernels/matmul) against XLA's dot, on a model's weight shapes.

For each weight shape [K, N] (default: SmolLM2-135M's q, k/v, o, gate/up, down and LM head) and
each row count M (decode batch sizes and a prefill chunk), times y = x @ W both ways on random data:
XLA's jnp.dot on the dense weight as the engine would hold it without packing, and packed_matmul on
the packed weight. Reports ms per call (best of --repeats rounds), the weight bytes streamed per
second, and the ratio. `cpu_kernels.matmul.caps()` says which path the kernel took (AVX-512 / AMX /
AVX2 + FMA / portable loops). Run on a quiet machine: other work on the cores shows up as noise.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

# SmolLM2-135M: hidden 576, 9 heads x 64, 3 KV heads, intermediate 1536, vocabulary 49152
DEFAULT_SHAPES = "576x576,576x192,576x1536,1536x576,576x49152"


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated KxN weight shapes")
    p.add_argument("--rows", default="1,16,64,512", help="comma-separated row counts M")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (the best is kept)")
    p.add_argument("--calls", type=int, default=10, help="calls per round")


def _best_ms(fn, args, repeats: int, calls: int) -> float:
    # Not bench.latency._median_ms (one call per sample): a one-row matmul takes ~0.1 ms, about as
    # long as a dispatch + block_until_ready round trip, so `calls` calls are queued per sample.
    fn(*args).block_until_ready()                   # compile + warm the caches
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            out = fn(*args)
        out.block_until_ready()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e3


def run(args) -> None:
    import jax
    import jax.numpy as jnp

    from cpu_kernels.matmul import caps, pack, packed_matmul
    bits = caps()
    paths = [name for bit, name in ((1, "f32 AVX-512"), (2, "bf16 AMX"), (4, "AVX2+FMA")) if bits & bit]
    print(f"cpu_kernels.matmul.caps() = {bits} ({', '.join(paths) or 'portable loops'}); "
          f"jax {jax.__version__}, {jax.device_count()} device(s)")
    rng = np.random.default_rng(0)
    xla = jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32))
    print("| dtype | K x N | M | XLA dot ms | packed ms | packed weight GB/s | XLA / packed |")
    print("|---|---|---|---|---|---|---|")
    for dtype in args.dtypes.split(","):
        for shape in args.shapes.split(","):
            k, n = (int(v) for v in shape.lower().split("x"))
            w = jnp.asarray(rng.standard_normal((k, n)), jnp.float32).astype(dtype)
            packed = pack(w, stacked=False)
            native = jax.jit(lambda x, p=packed: packed_matmul(x, p))
            for m in (int(v) for v in args.rows.split(",")):
                x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32).astype(dtype)
                t_xla = _best_ms(xla, (x, w), args.repeats, args.calls)
                t_nat = _best_ms(native, (x,), args.repeats, args.calls)
                gbs = w.size * w.dtype.itemsize / (t_nat * 1e-3) / 1e9
                print(f"| {dtype} | {k}x{n} | {m} | {t_xla:.3f} | {t_nat:.3f} | {gbs:.1f} | "
                      f"{t_xla / t_nat:.2f}x |", flush=True)
