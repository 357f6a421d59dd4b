"""The native packed weight matmul (cpu_kernels/matmul) against XLA's dot, on a model's weight shapes.

For each weight shape [K, N] (default: SmolLM2-135M's q, k/v, o, gate/up, down and LM head) and
each row count M (decode batch sizes and a prefill chunk), times y = x @ W both ways on random data:
XLA's jnp.dot on the dense weight as the engine would hold it without packing, and packed_matmul on
the packed weight. Reports ms per call (best of --repeats rounds), the weight bytes streamed per
second, and the ratio. `cpu_kernels.matmul.caps()` says which path the kernel took (AVX-512 / AMX /
AVX2 + FMA / portable loops). Run on a quiet machine: other work on the cores shows up as noise.

`--against REV`: instead, today's kernel against itself as it was at git revision REV, in one process
(bench/kernel_at_rev.py): the same stacked weights (--layers of them, cold each call, as in the model),
calls alternating, so the machine's drift cancels. This is how kernel changes are kept or dropped.

Quantized weights (--quantized, default int8): a second table per scheme with its native kernel
(int8: cpu_kernels/int8_matmul, GGUF Q8_0/Q4_0/Q4_1: cpu_kernels/gguf_matmul at every row count,
whatever the engine's cut-off), the path XLA runs without it (int8: the widening dot; GGUF:
dequantize the blocks, then the dot) and the packed float32 matmul the scheme replaces.
"""
from __future__ import annotations

import argparse
import functools
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
    p.add_argument("--against", default=None, metavar="REV",
                   help="time the packed matmul at git revision REV against this tree, alternating in one process")
    p.add_argument("--layers", type=int, default=30, help="--against: stacked layers per weight")
    p.add_argument("--quantized", default="int8",
                   help="comma-separated weight schemes of the second table: int8, Q8_0, Q4_0, Q4_1 ('' for none)")


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
    if args.against:
        from jaxpaged.bench.kernel_at_rev import compare
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
        return compare(args.against, shapes, [int(v) for v in args.rows.split(",")], args.dtypes.split(","),
                       args.layers, args.repeats)
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
    if args.quantized:
        _quantized_table(args, rng)


def _quantized_fns(scheme: str, w32):
    """(XLA path, native kernel, weight bytes) for the float32 weight w32 [K, N] stored as `scheme`;
    each fn takes x. The weights are jit arguments, not constants (XLA would fold a constant's
    dequantization at compile time and time a plain dot)."""
    import jax
    import jax.numpy as jnp

    if scheme == "int8":
        from cpu_kernels.int8_matmul import int8_matmul, pack_int8
        from jaxpaged.quantization import quantize_int8
        qw = quantize_int8(np.asarray(w32))
        qw = type(qw)(jnp.asarray(qw.q), jnp.asarray(qw.scale))
        packed = pack_int8(qw.q, qw.scale, stacked=False)
        return (functools.partial(jax.jit(lambda x, w: w.matmul(x)), w=qw),
                functools.partial(jax.jit(int8_matmul), w=packed), int(packed.data.size))
    import gguf

    from cpu_kernels.gguf_matmul import gguf_matmul
    from jaxpaged.gguf_blocks import GGUFBlocks
    raw = gguf.quants.quantize(np.asarray(w32).T.copy(), gguf.GGMLQuantizationType[scheme])    # [N, RB]
    data = jnp.asarray(raw)
    return (functools.partial(jax.jit(lambda x, d: GGUFBlocks(d, scheme).matmul(x)), d=data),
            functools.partial(jax.jit(lambda x, d: gguf_matmul(x, d, qtype=scheme)), d=data), int(raw.size))


def _quantized_table(args, rng) -> None:
    import jax
    import jax.numpy as jnp

    from cpu_kernels.matmul import pack, packed_matmul
    print("\n| weights | K x N | M | XLA ms | native ms | f32 packed ms | native weight GB/s | "
          "f32 packed / native | XLA / native |")
    print("|---|---|---|---|---|---|---|---|---|")
    f32_ms = {}                              # (k, n, m) -> the packed float32 time, measured once
    for scheme in args.quantized.split(","):
        for shape in args.shapes.split(","):
            k, n = (int(v) for v in shape.lower().split("x"))
            w32 = jnp.asarray(rng.standard_normal((k, n)), jnp.float32)
            xla, native, nbytes = _quantized_fns(scheme, w32)
            dense = jax.jit(lambda x, p=pack(w32, stacked=False): packed_matmul(x, p))
            for m in (int(v) for v in args.rows.split(",")):
                x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
                if (k, n, m) not in f32_ms:
                    f32_ms[(k, n, m)] = _best_ms(dense, (x,), args.repeats, args.calls)
                t_f32 = f32_ms[(k, n, m)]
                t_xla = _best_ms(xla, (x,), args.repeats, args.calls)
                t_nat = _best_ms(native, (x,), args.repeats, args.calls)
                gbs = nbytes / (t_nat * 1e-3) / 1e9
                print(f"| {scheme} | {k}x{n} | {m} | {t_xla:.3f} | {t_nat:.3f} | {t_f32:.3f} | {gbs:.1f} | "
                      f"{t_f32 / t_nat:.2f}x | {t_xla / t_nat:.2f}x |", flush=True)
