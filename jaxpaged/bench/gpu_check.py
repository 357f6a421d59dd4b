"""`bench gpu-check`: everything to run when a GPU is lent, in one go, into one report.

    python -m jaxpaged.bench gpu-check --out gpu_check.md

1. the GPU tests (tests/test_kernels_gpu.py: compiled kernels against the jnp references, the int8
   weight matmul among them; and the CUDA lowering tests), via pytest;
2. attention kernel bandwidth: decode at batch 1/8/64 x context 1k/8k/32k and two prefill chunks,
   Llama-3-8B heads in bf16: median time, GB/s of the bytes the kernel must move
   (pallas_kernels.gpu_estimate) and % of the device's HBM peak, next to the paper estimate; on
   jax >= 0.11 for both kernels (Triton and Mosaic GPU), a kernel that fails reported, not fatal;
3. an end-to-end offline throughput run (`bench throughput`, the built-in SmolLM2 model, bf16).
Writes a markdown report (and the rows as JSON beside it). Exits 2 at once, with the reason, when
jax sees no GPU; exits 1 when a GPU test or a kernel failed.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

BATCHES = (1, 8, 64)
CONTEXTS = (1024, 8192, 32768)
PREFILLS = ((2048, 2048), (2048, 8192))     # (chunk, context)


def add_args(p) -> None:
    p.add_argument("--out", default="gpu_check.md", help="report path (JSON rows next to it)")
    p.add_argument("--model-shapes", default="llama3-8b", help="heads of the kernel runs (pallas_kernels.gpu_estimate.MODELS)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--quick", action="store_true", help="batch 1/64 x 8k only, short e2e run (smoke test)")
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--skip-e2e", action="store_true")


def require_gpu():
    """The first GPU, or SystemExit(2) saying what jax sees instead."""
    import jax
    try:
        gpus = jax.devices("gpu")
    except RuntimeError:
        gpus = []
    if not gpus:
        raise SystemExit(f"gpu-check needs a CUDA GPU visible to jax; jax sees {jax.devices()} "
                         f"(install jaxpaged[cuda12] and check nvidia-smi / JAX_PLATFORMS)")
    return gpus[0]


def run_tests() -> dict:
    """The GPU test files of the source checkout this package runs from."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    files = ["tests/test_kernels_gpu.py", "tests/test_kernels_gpu_lowering.py",
             "tests/test_weight_kernels_gpu_lowering.py"]
    if not all(os.path.exists(os.path.join(root, f)) for f in files):
        return dict(ok=False, returncode=None, seconds=0.0, tail=f"{files} not found under {root}: run from a checkout")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files]
    env = dict(os.environ)
    env.pop("JAX_PLATFORMS", None)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root)
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
    return dict(ok=proc.returncode == 0, returncode=proc.returncode, seconds=time.perf_counter() - t0,
                tail="\n".join(tail))


def _attention_row(name, q_lens, ctx_lens, shapes, block_size, repeats, peak, kernel):
    import jax
    import jax.numpy as jnp

    from pallas_kernels import ragged_paged_attention
    from pallas_kernels.benchmark import Case, _make_inputs, _time
    from pallas_kernels.gpu_estimate import estimate

    nh, kvh, d = shapes
    x = _make_inputs(Case(name, q_lens, ctx_lens), num_heads=nh, num_kv_heads=kvh, head_dim=d,
                     block_size=block_size, num_layers=1, dtype=jnp.bfloat16)
    attend = jax.jit(lambda q, k, v, bt, sl, qs: ragged_paged_attention(q, k, v, bt, sl, qs, sm_scale=d ** -0.5,
                                                                        gpu_kernel=kernel))
    ms, _ = _time(attend, (x["q"], x["k"][0], x["v"][0], x["bt"], x["lens"], x["qs"]), repeats)
    e = estimate(q_lens, ctx_lens, num_heads=nh, num_kv_heads=kvh, head_dim=d, block_size=block_size)
    gbps = e.bytes / ms / 1e6
    del x
    return dict(case=f"{kernel}: {name}", ms=ms, gbps=gbps, pct_peak=None if peak is None else 100 * gbps / peak,
                tflops=e.flops / ms / 1e9, programs=e.programs, kv_splits=e.kv_splits,
                iterations=e.iterations, mbytes=e.bytes / 1e6,
                ideal_us=None if peak is None else e.ideal_us(peak))


def run_bandwidth(args, peak) -> list[dict]:
    """Both GPU kernels where the jax line has both (Mosaic GPU from 0.11), Triton otherwise."""
    import jax

    from pallas_kernels.gpu_estimate import MODELS, decode_case, prefill_case

    shapes = MODELS[args.model_shapes]
    batches, contexts = ((1, 64), (8192,)) if args.quick else (BATCHES, CONTEXTS)
    cases = [(f"decode B={b} ctx={c}", decode_case(b, c)) for b in batches for c in contexts]
    cases += [(f"prefill {n} @ ctx {c}", prefill_case(n, c)) for n, c in (PREFILLS[:1] if args.quick else PREFILLS)]
    rows = []
    for kernel in ("triton", "mosaic") if jax.__version_info__ >= (0, 11) else ("triton",):
        for name, (q_lens, ctx_lens) in cases:
            try:
                rows.append(_attention_row(name, q_lens, ctx_lens, shapes, args.block_size, args.repeats, peak,
                                           kernel))
            except Exception as e:       # a kernel that fails to compile or run is a finding, not the end
                rows.append(dict(case=f"{kernel}: {name}", error=f"{type(e).__name__}: {str(e)[:300]}"))
                print(f"  {rows[-1]['case']}: FAILED {rows[-1]['error']}", flush=True)
                continue
            print(f"  {rows[-1]['case']}: {rows[-1]['ms']:.3f} ms, {rows[-1]['gbps']:.0f} GB/s", flush=True)
    return rows


def run_e2e(args) -> dict:
    n = 64 if args.quick else 512
    cmd = [sys.executable, "-m", "jaxpaged.bench", "throughput", "--backend", "jaxpaged", "--dtype", "bfloat16",
           "--num-prompts", str(n), "--input-len-range", "128:1024", "--output-len-range", "64:512",
           "--ignore-eos", "--max-num-seqs", "128", "--max-num-batched-tokens", "2048", "--max-model-len", "2048"]
    env = dict(os.environ)
    env.pop("JAX_PLATFORMS", None)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    return dict(ok=proc.returncode == 0, command=" ".join(cmd[1:]),
                tail="\n".join((proc.stdout + proc.stderr).strip().splitlines()[-12:]))


def _fmt(v, spec):
    return "n/a" if v is None else format(v, spec)


def write_report(path, device, peak, tests, rows, e2e) -> None:
    lines = [f"# gpu-check: {device.device_kind}", "",
             f"HBM peak used for %: {_fmt(peak, '.0f')} GB/s; kernel heads: see --model-shapes.", ""]
    if tests is not None:
        lines += [f"## GPU tests: {'PASS' if tests['ok'] else 'FAIL'} ({tests['seconds']:.0f} s)", "",
                  "```", tests["tail"], "```", ""]
    lines += ["## Attention kernel (bf16)", "",
              "| case | ms | GB/s | % HBM peak | TFLOP/s | programs | S | iterations | MB moved | ideal us |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | FAILED: {r['error']} |")
            continue
        lines.append(f"| {r['case']} | {r['ms']:.3f} | {r['gbps']:.0f} | {_fmt(r['pct_peak'], '.1f')} | "
                     f"{r['tflops']:.1f} | {r['programs']} | {r['kv_splits']} | {r['iterations']} | "
                     f"{r['mbytes']:.1f} | {_fmt(r['ideal_us'], '.1f')} |")
    lines.append("")
    if e2e is not None:
        lines += [f"## End-to-end throughput: {'ok' if e2e['ok'] else 'FAILED'}", "",
                  f"`python -m {e2e['command']}`", "", "```", e2e["tail"], "```", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))
    with open(os.path.splitext(path)[0] + ".json", "w") as f:
        json.dump(dict(device=device.device_kind, peak_gbps=peak, tests=tests, attention=rows, e2e=e2e), f, indent=1)


def run(args) -> None:
    from pallas_kernels.gpu_estimate import hbm_peak_gbps

    device = require_gpu()
    peak = hbm_peak_gbps(device.device_kind)
    print(f"gpu-check on {device.device_kind} (HBM peak {_fmt(peak, '.0f')} GB/s)", flush=True)
    tests = None if args.skip_tests else run_tests()
    if tests is not None:
        print(f"GPU tests: {'PASS' if tests['ok'] else 'FAIL'}\n{tests['tail']}", flush=True)
    rows = run_bandwidth(args, peak)
    e2e = None if args.skip_e2e else run_e2e(args)
    write_report(args.out, device, peak, tests, rows, e2e)
    print(f"report: {args.out}")
    if (tests is not None and not tests["ok"]) or any("error" in r for r in rows):
        raise SystemExit(1)
