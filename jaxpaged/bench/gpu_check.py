"""`bench gpu-check`: everything to run when a GPU is lent, in one go, into one report.

    python -m jaxpaged.bench gpu-check --out gpu_check.md [--e2e-model DIR]

1. the GPU tests (tests/test_kernels_gpu.py: compiled kernels against the jnp references, the int8
   and GGUF weight matmuls among them; and the CUDA lowering tests), via pytest (pytest-xdist
   workers when it is installed);
2. attention kernel bandwidth: decode at batch 1/8/64 x context 1k/8k/32k and two prefill chunks,
   Llama-3-8B heads in bf16: median time, GB/s of the bytes the kernel must move
   (pallas_kernels.gpu_estimate) and % of the device's HBM peak, next to the paper estimate; on
   jax >= 0.11 for both kernels (Triton and Mosaic GPU), a kernel that fails reported, not fatal;
3. an end-to-end offline throughput run (`bench throughput`, bf16; the built-in SmolLM2 model, or
   `--e2e-model`, e.g. a `bench random-model` checkpoint where the weights cannot be fetched).
The report (markdown, and the rows as JSON beside it) is rewritten after every stage, so a run cut
short keeps what it measured. Exits 2 at once, with the reason, when jax sees no GPU (unless
--dry-run); exits 1 when a GPU test or a kernel failed.

--dry-run runs the same stages on CPU, kernels in interpret mode at small shapes: it checks this
script, not a GPU (the test suite runs it).
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
GPU_TEST_FILES = ("tests/test_kernels_gpu.py", "tests/test_kernels_gpu_lowering.py",
                  "tests/test_weight_kernels_gpu_lowering.py")


def add_args(p) -> None:
    p.add_argument("--out", default="gpu_check.md", help="report path (JSON rows next to it)")
    p.add_argument("--model-shapes", default="llama3-8b", help="heads of the kernel runs (pallas_kernels.gpu_estimate.MODELS)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=20, help="timed repeats per case (median); each times 10 calls")
    p.add_argument("--quick", action="store_true", help="batch 1/64 x 8k only, short e2e run (smoke test)")
    p.add_argument("--kernels", default=None, help="comma-separated subset of triton,mosaic (default: all of this jax line)")
    p.add_argument("--mosaic-variants", default=None,
                   help="time these Mosaic GPU tilings too, each checked against the reference first: "
                        "comma-separated STAGES:COMPUTE_WGS[:SPLITS], e.g. 3:1,4:2,4:2:32")
    p.add_argument("--tests", default=None, help="pytest -k expression selecting among the GPU tests")
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--skip-e2e", action="store_true")
    p.add_argument("--tests-timeout", type=float, default=300.0, help="seconds for the GPU tests")
    p.add_argument("--test-workers", type=int, default=None, help="pytest-xdist workers (default: min(8, cores) if installed)")
    p.add_argument("--bandwidth-budget", type=float, default=240.0,
                   help="seconds for the kernel runs: cases past it are reported as skipped")
    p.add_argument("--e2e-model", default="smollm2-135m-instruct", help="model of the end-to-end run")
    p.add_argument("--e2e-num-prompts", type=int, default=None, help="default 512 (64 with --quick)")
    p.add_argument("--e2e-timeout", type=float, default=300.0, help="seconds for the end-to-end run")
    p.add_argument("--dry-run", action="store_true", help="CPU, interpret mode, small shapes: checks the script only")


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


def _subprocess(cmd, timeout, cwd=None, env=None, log=None) -> dict:
    """Runs cmd; returns ok, returncode (None on time-out), seconds and the output's last lines
    (the whole output written to `log` when given)."""
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)
        out, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        text = lambda b: b.decode(errors="replace") if isinstance(b, bytes) else (b or "")
        out = text(e.stdout) + text(e.stderr) + f"\n(timed out after {timeout:.0f} s)"
        rc = None
    if log:
        with open(log, "w") as f:
            f.write(out)
    return dict(ok=rc == 0, returncode=rc, seconds=time.perf_counter() - t0,
                tail="\n".join(out.strip().splitlines()[-25:]))


def _gpu_env(dry_run: bool) -> dict:
    """The children's environment: the GPU first (tests/conftest.py defaults JAX_PLATFORMS to cpu),
    no preallocation (several processes share the GPU)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu" if dry_run else "cuda,cpu")
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    return env


def _log_path(args, stage: str) -> str:
    return os.path.splitext(args.out)[0] + f".{stage}.log"


def run_tests(args) -> dict:
    """The GPU test files of the source checkout this package runs from."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if not all(os.path.exists(os.path.join(root, f)) for f in GPU_TEST_FILES):
        return dict(ok=False, returncode=None, seconds=0.0, tail=f"{GPU_TEST_FILES} not found under {root}: run from a checkout")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:benchmark", "-rfE",
           "-W", "ignore::DeprecationWarning", *GPU_TEST_FILES]
    workers = args.test_workers
    if workers is None:
        import importlib.util
        workers = min(8, os.cpu_count() or 1) if importlib.util.find_spec("xdist") else 0
    if workers > 1:
        cmd += ["-n", str(workers)]
    if args.tests:
        cmd += ["-k", args.tests]
    return _subprocess(cmd, args.tests_timeout, cwd=root, env=_gpu_env(args.dry_run), log=_log_path(args, "tests"))


def device_inputs(q_lens, ctx_lens, *, num_heads, num_kv_heads, head_dim, block_size, dtype, seed=0):
    """Random q and a paged cache [KVH, NB, BS, D] made on the device (jax.random: a 32k x 64 cache is GBs),
    block tables a host permutation (block 0 the null block). T = sum(q_lens) padded to 64."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(seed)
    b, t = len(q_lens), -(-sum(q_lens) // 64) * 64
    pages = [-(-c // block_size) for c in ctx_lens]
    num_blocks = 1 + sum(pages)
    perm = rng.permutation(np.arange(1, num_blocks)).astype(np.int32)
    bt = np.zeros((b, max(pages)), np.int32)
    starts = np.concatenate([[0], np.cumsum(pages)])
    for i, n in enumerate(pages):
        bt[i, :n] = perm[starts[i]:starts[i + 1]]
    kk, kv, kq = jax.random.split(jax.random.key(seed), 3)
    shape = (num_kv_heads, num_blocks, block_size, head_dim)
    qs = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    return dict(q=jax.random.normal(kq, (t, num_heads, head_dim), dtype),
                k=jax.random.normal(kk, shape, dtype), v=jax.random.normal(kv, shape, dtype),
                bt=jnp.asarray(bt), lens=jnp.asarray(ctx_lens, jnp.int32), qs=jnp.asarray(qs))


def time_calls(fn, args, repeats, inner=10) -> float:
    """Median over `repeats` of the mean time (ms) of `inner` back-to-back calls, after a warm-up
    (compile) call: queued launches hide the host's dispatch gap between calls."""
    import jax
    import numpy as np

    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) * 1e3 / inner)
    return float(np.median(times))


def parse_variants(text: str | None) -> list[tuple[int, int, int | None]]:
    """'3:1,4:2:32' -> [(3, 1, None), (4, 2, 32)]: (stages, compute warpgroups, KV splits or default)."""
    out = []
    for item in (text or "").split(","):
        if not item.strip():
            continue
        parts = [int(x) for x in item.split(":")]
        if len(parts) not in (2, 3):
            raise SystemExit(f"--mosaic-variants {item!r}: expected STAGES:COMPUTE_WGS[:SPLITS]")
        out.append((parts[0], parts[1], parts[2] if len(parts) == 3 else None))
    return out


def variant_tiling(variant, dtype, nh, kvh, d, bs, batch, max_context):
    """The Mosaic GPU tiling of a (stages, compute_wgs, splits) variant for this shape."""
    from pallas_kernels.attention_mosaic import mosaic_tiling
    from pallas_kernels.ragged_paged_attention import default_gpu_tiling

    base = default_gpu_tiling(dtype, nh, kvh, d, bs, batch, max_context, "mosaic")
    stages, wgs, splits = variant
    return mosaic_tiling(nh, kvh, d, splits or base.kv_splits, stages=stages, compute_wgs=wgs)


def check_variant(variant, shapes, block_size) -> float:
    """Max |kernel - reference| of a variant on a mixed batch (decodes at page edges, two prefill
    chunks, a padding sequence); raises when it is off."""
    import jax.numpy as jnp
    import numpy as np

    from pallas_kernels import ragged_paged_attention, ragged_paged_attention_reference

    nh, kvh, d = shapes
    q_lens = (1,) * 6 + (300, 70)
    ctx_lens = (1, 15, 16, 17, 1000, 4097, 700, 70)
    x = device_inputs(q_lens, ctx_lens, num_heads=nh, num_kv_heads=kvh, head_dim=d, block_size=block_size,
                      dtype=jnp.bfloat16, seed=1)
    t = variant_tiling(variant, jnp.bfloat16, nh, kvh, d, block_size, len(q_lens), x["bt"].shape[1] * block_size)
    args = (x["q"], x["k"], x["v"], x["bt"], x["lens"], x["qs"])
    out = np.asarray(ragged_paged_attention(*args, sm_scale=d ** -0.5, tiling=t, interpret=False), np.float32)
    ref = np.asarray(ragged_paged_attention_reference(*args, sm_scale=d ** -0.5), np.float32)
    err = float(np.abs(out - ref).max())
    if not np.isfinite(err) or err > 3e-2:
        raise AssertionError(f"variant {variant}: max error {err} against the reference")
    return err


def _attention_row(name, q_lens, ctx_lens, shapes, block_size, repeats, peak, kernel, interpret, variant=None):
    import jax
    import jax.numpy as jnp

    from pallas_kernels import ragged_paged_attention
    from pallas_kernels.gpu_estimate import estimate

    nh, kvh, d = shapes
    dtype = jnp.bfloat16
    x = device_inputs(q_lens, ctx_lens, num_heads=nh, num_kv_heads=kvh, head_dim=d, block_size=block_size,
                      dtype=dtype)
    # decode-only cases pass max_query_len=1 (what the engine's decode buckets do): no prefill programs
    mql = 1 if max(q_lens) == 1 else None
    if interpret:
        from pallas_kernels.ragged_paged_attention import default_gpu_tiling
        tiling = default_gpu_tiling(dtype, nh, kvh, d, block_size, len(q_lens), x["bt"].shape[1] * block_size, kernel)
        attend = jax.jit(lambda q, k, v, bt, sl, qs: ragged_paged_attention(
            q, k, v, bt, sl, qs, sm_scale=d ** -0.5, interpret=True, tiling=tiling, max_query_len=mql))
    elif variant is not None:
        tiling = variant_tiling(variant, dtype, nh, kvh, d, block_size, len(q_lens), x["bt"].shape[1] * block_size)
        attend = jax.jit(lambda q, k, v, bt, sl, qs: ragged_paged_attention(
            q, k, v, bt, sl, qs, sm_scale=d ** -0.5, tiling=tiling, interpret=False, max_query_len=mql))
    else:
        attend = jax.jit(lambda q, k, v, bt, sl, qs: ragged_paged_attention(
            q, k, v, bt, sl, qs, sm_scale=d ** -0.5, gpu_kernel=kernel, max_query_len=mql))
    ms = time_calls(attend, (x["q"], x["k"], x["v"], x["bt"], x["lens"], x["qs"]), repeats, 1 if interpret else 10)
    e = estimate(q_lens, ctx_lens, num_heads=nh, num_kv_heads=kvh, head_dim=d, block_size=block_size)
    kernel_ms = None if interpret or kernel != "mosaic" or variant else _mosaic_kernel_ms(x, d, mql, repeats)
    gbps = e.bytes / ms / 1e6
    del x
    label = kernel if variant is None else "mosaic {}:{}:{}".format(*variant)
    return dict(case=f"{label}: {name}", ms=ms, gbps=gbps, pct_peak=None if peak is None else 100 * gbps / peak,
                kernel_ms=kernel_ms,
                kernel_pct_peak=None if peak is None or kernel_ms is None else 100 * e.bytes / kernel_ms / 1e6 / peak,
                tflops=e.flops / ms / 1e9, programs=e.programs, kv_splits=e.kv_splits,
                iterations=e.iterations, mbytes=e.bytes / 1e6,
                ideal_us=None if peak is None else e.ideal_us(peak))


def _mosaic_kernel_ms(x, head_dim, max_query_len, repeats) -> float | None:
    """The Mosaic GPU kernel's time alone (its XLA prologue and epilogue run once, outside the timing)."""
    import functools

    import jax
    import jax.numpy as jnp

    from pallas_kernels import attention_mosaic
    from pallas_kernels.attention_triton import num_prefill_blocks
    from pallas_kernels.ragged_paged_attention import default_gpu_tiling

    (t_tokens, nh, d), (kvh, _, bs, _) = x["q"].shape, x["k"].shape
    batch = x["bt"].shape[0]
    t = default_gpu_tiling(x["k"].dtype, nh, kvh, d, bs, batch, x["bt"].shape[1] * bs, "mosaic")
    if t.kernel != "mosaic":
        return None
    nb = num_prefill_blocks(t_tokens, batch, t, max_query_len)
    prep = jax.jit(functools.partial(attention_mosaic.kernel_inputs, num_kv_heads=kvh, t=t, window=None, num_blocks=nb))
    info, q_all = prep(x["q"], x["lens"], x["qs"])
    call = jax.jit(functools.partial(attention_mosaic.kernel_call, t=t, sm_scale=head_dim ** -0.5, soft_cap=None,
                                     window=None, interpret=False))
    return time_calls(call, (info, x["bt"], jnp.zeros((1,), jnp.int32), q_all, x["k"][None], x["v"][None]), repeats)


def bandwidth_cases(args) -> list[tuple[str, tuple, tuple]]:
    from pallas_kernels.gpu_estimate import decode_case, prefill_case

    if args.dry_run:
        return [("decode B=2 ctx=300", *decode_case(2, 300)), ("prefill 96 @ ctx 200", *prefill_case(96, 200))]
    batches, contexts = ((1, 64), (8192, 32768)) if args.quick else (BATCHES, CONTEXTS)
    cases = [(f"decode B={b} ctx={c}", *decode_case(b, c)) for b in batches for c in contexts]
    return cases + [(f"prefill {n} @ ctx {c}", *prefill_case(n, c)) for n, c in (PREFILLS[:1] if args.quick else PREFILLS)]


def gpu_kernels(args) -> tuple[str, ...]:
    import jax
    line = ("triton", "mosaic") if jax.__version_info__ >= (0, 11) else ("triton",)
    if args.kernels is None:
        return line
    chosen = tuple(k.strip() for k in args.kernels.split(",") if k.strip())
    bad = [k for k in chosen if k not in line]
    if bad or not chosen:
        raise SystemExit(f"--kernels {args.kernels!r}: this jax line has {line}")
    return chosen


def run_bandwidth(args, peak, on_row=lambda rows: None) -> list[dict]:
    """Both GPU kernels where the jax line has both (Mosaic GPU from 0.11), Triton otherwise."""
    from pallas_kernels.gpu_estimate import MODELS

    shapes = MODELS["smollm2-135m" if args.dry_run else args.model_shapes]
    rows, t0 = [], time.perf_counter()
    runs = [(k, None) for k in gpu_kernels(args)]
    if not args.dry_run:
        runs += [("mosaic", v) for v in parse_variants(args.mosaic_variants)]
    for kernel, variant in runs:
        if variant is not None:
            try:
                err = check_variant(variant, shapes, args.block_size)
                print(f"  mosaic {variant}: max error {err:.2e} against the reference", flush=True)
            except Exception as e:
                rows.append(dict(case=f"mosaic {variant}: check", error=f"{type(e).__name__}: {str(e)[:600]}"))
                print(f"  {rows[-1]['case']}: FAILED {rows[-1]['error']}", flush=True)
                continue
        for name, q_lens, ctx_lens in bandwidth_cases(args):
            case = f"{kernel if variant is None else variant}: {name}"
            if time.perf_counter() - t0 > args.bandwidth_budget:
                rows.append(dict(case=case, skipped=f"past --bandwidth-budget {args.bandwidth_budget:.0f} s"))
                continue
            try:
                rows.append(_attention_row(name, q_lens, ctx_lens, shapes, args.block_size,
                                           2 if args.dry_run else args.repeats, peak, kernel, args.dry_run, variant))
            except Exception as e:       # a kernel that fails to compile or run is a finding, not the end
                rows.append(dict(case=case, error=f"{type(e).__name__}: {str(e)[:600]}"))
                print(f"  {case}: FAILED {rows[-1]['error']}", flush=True)
            else:
                print(f"  {case}: {rows[-1]['ms']:.3f} ms, {rows[-1]['gbps']:.0f} GB/s", flush=True)
            on_row(rows)
    return rows


def e2e_command(args) -> list[str]:
    n = args.e2e_num_prompts or (8 if args.dry_run else 64 if args.quick else 512)
    lens = ("16:48", "4:8", "16", "256", "256") if args.dry_run else ("128:1024", "64:512", "128", "2048", "2048")
    return [sys.executable, "-m", "jaxpaged.bench", "throughput", "--backend", "jaxpaged", "--model", args.e2e_model,
            "--dtype", "bfloat16", "--num-prompts", str(n), "--input-len-range", lens[0],
            "--output-len-range", lens[1], "--ignore-eos", "--max-num-seqs", lens[2],
            "--max-num-batched-tokens", lens[3], "--max-model-len", lens[4]]


def run_e2e(args) -> dict:
    cmd = e2e_command(args)
    res = _subprocess(cmd, args.e2e_timeout, env=_gpu_env(args.dry_run), log=_log_path(args, "e2e"))
    return dict(res, command=" ".join(cmd[2:]))


def _fmt(v, spec):
    return "n/a" if v is None else format(v, spec)


def write_report(path, device, peak, tests, rows, e2e) -> None:
    lines = [f"# gpu-check: {device.device_kind}", "",
             f"HBM peak used for %: {_fmt(peak, '.0f')} GB/s; kernel heads: see --model-shapes.", ""]
    if tests is not None:
        lines += [f"## GPU tests: {'PASS' if tests['ok'] else 'FAIL'} ({tests['seconds']:.0f} s)", "",
                  "```", tests["tail"], "```", ""]
    lines += ["## Attention kernel (bf16)", "",
              "| case | ms | GB/s | % HBM peak | kernel alone ms | kernel % HBM peak | TFLOP/s | programs | S | iterations | MB moved | ideal us |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['case']} | skipped: {r['skipped']} |")
            continue
        if "error" in r:
            lines.append(f"| {r['case']} | FAILED: {r['error']} |")
            continue
        lines.append(f"| {r['case']} | {r['ms']:.3f} | {r['gbps']:.0f} | {_fmt(r['pct_peak'], '.1f')} | "
                     f"{_fmt(r.get('kernel_ms'), '.3f')} | {_fmt(r.get('kernel_pct_peak'), '.1f')} | "
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

    if args.dry_run:
        import jax
        device = jax.devices("cpu")[0]
    else:
        device = require_gpu()
    peak = hbm_peak_gbps(device.device_kind)
    print(f"gpu-check on {device.device_kind} (HBM peak {_fmt(peak, '.0f')} GB/s)", flush=True)
    tests, rows, e2e = None, [], None
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

    def save():
        write_report(args.out, device, peak, tests, rows, e2e)

    if not args.skip_tests:
        tests = run_tests(args)
        print(f"GPU tests: {'PASS' if tests['ok'] else 'FAIL'} ({tests['seconds']:.0f} s)\n{tests['tail']}", flush=True)
        save()
    rows = run_bandwidth(args, peak, on_row=lambda r: write_report(args.out, device, peak, tests, r, e2e))
    save()
    if not args.skip_e2e:
        e2e = run_e2e(args)
        print(f"end-to-end: {'ok' if e2e['ok'] else 'FAILED'}\n{e2e['tail']}", flush=True)
        save()
    print(f"report: {args.out}")
    if (tests is not None and not tests["ok"]) or any("error" in r for r in rows) or (e2e is not None and not e2e["ok"]):
        raise SystemExit(1)
