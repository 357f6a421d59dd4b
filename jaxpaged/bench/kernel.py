"""`bench kernel`: ragged paged attention and the KV-cache write, Pallas kernel vs jnp reference (and,
on CPU, the native attention of cpu_kernels vs the same reference).

Runs pallas_kernels.benchmark.run_kernel_benchmark (decode-only, prefill-only and mixed batches over
a paged cache with permuted block tables) with the head shapes of a model (default SmolLM2-135M:
9 query heads, 3 KV heads, head_dim 64) and prints wall times, kernel/reference ratio and max error.
On CPU the kernel runs in Pallas interpret mode; on a GPU as Triton.
"""
from __future__ import annotations

SHAPES = {"smollm2-135m": (9, 3, 64), "llama-8b": (32, 8, 128)}


def add_args(p) -> None:
    p.add_argument("--shapes", default="smollm2-135m", choices=sorted(SHAPES), help="NH, KVH, D of a model")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--scale", type=int, default=1, help="multiply the context lengths of the cases")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="only the decode case, 1 repeat (smoke test)")


def run(args) -> list[dict]:
    import jax

    from pallas_kernels.benchmark import default_cases, format_table, run_kernel_benchmark

    nh, kvh, d = SHAPES[args.shapes]
    cases = default_cases(args.scale)
    if args.quick:
        from pallas_kernels.benchmark import Case
        cases = [Case("decode 8 seqs", (1,) * 8, tuple(range(40, 360, 40)))]
    common = dict(num_heads=nh, num_kv_heads=kvh, head_dim=d, block_size=args.block_size, dtype=args.dtype,
                  repeats=1 if args.quick else args.repeats)
    rows = run_kernel_benchmark(cases, **common)
    if jax.default_backend() == "cpu":
        from cpu_kernels import available, ragged_paged_attention_cpu
        if available():
            rows += run_kernel_benchmark(cases, attention=ragged_paged_attention_cpu, label="attention native",
                                         with_write=False, **common)
    print(f"backend={jax.default_backend()} dtype={args.dtype} NH={nh} KVH={kvh} D={d} BS={args.block_size}")
    print(format_table(rows))
    return rows
