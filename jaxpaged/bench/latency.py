"""`bench latency`: where one engine step's time goes, at one or several decode batch sizes.

    python -m jaxpaged.bench latency --batch-size 64 --input-len 256 --output-len 64
    python -m jaxpaged.bench latency --batch-sizes 1,8,32,128 --flops --breakdown

For each batch size B: B requests of `input-len` random prompt tokens each generate `output-len`
tokens (ignore_eos, greedy) through LLMEngine.step; the first `--skip` decode steps (compilation)
are dropped. Every step is split (profiling.StepTimer) into host scheduling, input building,
sampling-input building, the device step (block_until_ready) and the rest (device->host copy,
scheduler update, detokenization). Decode-step time is set against the machine's matmul FLOP
ceiling (`--flops`: big jnp matmuls, f32 and bf16) via the model's FLOPs per token.

`--breakdown` replays the captured decode step (and the largest prefill step) through variants of
the jitted step: as the engine runs it, with the jnp attention instead of Pallas, without the
attention call (KV write and read skipped), with the KV write but no attention read, the forward
only (no LM head, no sampling), the LM head alone, and the sampler alone (greedy and top-p).
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

from jaxpaged.engine_config import ATTENTION_BACKENDS
from jaxpaged.kv_dtypes import KV_CACHE_DTYPE_CHOICES


def add_args(p) -> None:
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--batch-sizes", default=None, help="comma-separated; overrides --batch-size")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=16,
                   help="decode steps timed with all B sequences decoding (requests get enough extra tokens)")
    p.add_argument("--skip", type=int, default=3, help="decode steps dropped per batch size (compilation)")
    p.add_argument("--max-num-seqs", type=int, default=None, help="default: the largest batch size")
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--native-matmul", action=argparse.BooleanOptionalAction, default=True,
                   help="jaxpaged: pre-packed native weight matmuls where the CPU has the instructions")
    p.add_argument("--attention-backend", default="auto", choices=ATTENTION_BACKENDS,
                   help="attention kernels (auto: native C++ on CPU, else Pallas)")
    p.add_argument("--quantization", default=None, choices=("int8", "gguf"),
                   help="jaxpaged: weight quantization (EngineConfig.quantization)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPE_CHOICES,
                   help="jaxpaged: KV cache dtype (EngineConfig.kv_cache_dtype; int8 / fp8: 8-bit K/V + scales)")
    p.add_argument("--flops", action="store_true", help="measure the matmul FLOP ceiling (f32, bf16)")
    p.add_argument("--breakdown", action="store_true", help="device-step variants on the captured steps")
    p.add_argument("--ops", type=int, default=0, metavar="N",
                   help="per-op profile (jax.profiler trace) of the captured steps: the N longest XLA ops")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per variant / matmul")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--download-dir", default=None)


# ---------------------------------------------------------------------------- FLOPs

def model_flops_per_token(cfg, context: int = 0) -> float:
    """Matmul FLOPs of one token through the model incl. the LM head, plus attention at `context`."""
    h, d, i = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    per_layer = h * cfg.num_heads * d * 2 + 2 * h * cfg.num_kv_heads * d + 3 * h * i
    attn = 4 * cfg.num_heads * d * context
    return 2.0 * (cfg.num_layers * per_layer + h * cfg.vocab_size) + cfg.num_layers * attn


def _median_ms(fn, repeats: int, with_cpu: bool = False):
    """Median wall ms of fn() after one untimed call; with_cpu: (wall ms, median process CPU ms)."""
    import jax
    jax.block_until_ready(fn())
    ts, cs = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t0)
        cs.append(time.process_time() - c0)
    wall, cpu = 1e3 * float(np.median(ts)), 1e3 * float(np.median(cs))
    return (wall, cpu) if with_cpu else wall


def matmul_ceiling(repeats: int = 5, n: int = 2048, hidden: int = 576, inter: int = 1536) -> list[dict]:
    """GFLOP/s of square n^3 matmuls and of the model's MLP-shaped matmul at a few row counts."""
    import jax
    import jax.numpy as jnp

    rows = []
    rng = np.random.default_rng(0)
    for dtype in ("float32", "bfloat16"):
        a = jnp.asarray(rng.standard_normal((n, n)), dtype)
        b = jnp.asarray(rng.standard_normal((n, n)), dtype)
        f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
        ms = _median_ms(lambda: f(a, b), repeats)
        rows.append(dict(shape=f"{n}x{n}x{n}", dtype=dtype, ms=ms, gflops=2 * n ** 3 / ms / 1e6))
        w = jnp.asarray(rng.standard_normal((hidden, inter)), dtype)
        for m in (1, 2, 8, 32, 128, 512):
            x = jnp.asarray(rng.standard_normal((m, hidden)), dtype)
            ms = _median_ms(lambda: f(x, w), max(repeats, 20))
            rows.append(dict(shape=f"{m}x{hidden}x{inter}", dtype=dtype, ms=ms, gflops=2 * m * hidden * inter / ms / 1e6))
    return rows


# ---------------------------------------------------------------------------- engine runs

class _Capture:
    """A step hook keeping the inputs of the widest decode step and of the largest prefill step."""

    def __init__(self, engine):
        self.engine = engine
        self.decode = self.prefill = None
        engine.add_step_hook(self)

    def on_inputs(self, inp, sampling) -> None:
        if inp.num_tokens == 0:
            return
        if inp.num_tokens == inp.num_seqs:
            if self.decode is None or inp.num_seqs >= self.decode[0].num_seqs:
                self.decode = (inp, sampling)
        elif self.prefill is None or inp.num_tokens >= self.prefill[0].num_tokens:
            self.prefill = (inp, sampling)

    def close(self):
        self.engine.remove_step_hook(self)


def run_batch(llm, batch: int, args, capture: bool = False):
    """Runs one batch through the engine; returns (decode records, all records, capture or None)."""
    from jaxpaged import SamplingParams
    from jaxpaged.bench.profiling import StepTimer

    engine = llm.llm_engine
    rng = np.random.default_rng(args.seed + batch)
    vocab = engine.model_config.vocab_size
    # chunked prefill: the first requests decode while the last prompts are still prefilling; give
    # every request enough extra tokens that all B decode together for `skip + output_len` steps
    budget = engine.config.max_num_batched_tokens
    extra = -(-batch * args.input_len // max(1, budget - batch)) + 1
    for i in range(batch):
        engine.add_request(f"lat-{batch}-{i}", rng.integers(100, vocab, args.input_len).tolist(),
                           SamplingParams(temperature=0.0, max_tokens=args.skip + args.output_len + extra,
                                          ignore_eos=True))
    cap = _Capture(engine) if capture else None
    timer = StepTimer(engine)
    try:
        while engine.has_unfinished_requests():
            engine.step()
    finally:
        timer.close()
        if cap is not None:
            cap.close()
    decode = [r for r in timer.records if r.is_decode and r.num_seqs == batch][args.skip:][:args.output_len]
    return decode, timer, cap


def _split_line(recs) -> dict:
    from jaxpaged.bench.profiling import PARTS
    n = max(1, len(recs))
    out = {p: 1e3 * sum(r.times[p] for r in recs) / n for p in PARTS + ("step", "device_cpu")}
    out["host"] = out["step"] - out["device"]
    return out


# ---------------------------------------------------------------------------- device-step variants

def breakdown(runner, captured, repeats: int) -> list[tuple[str, float]]:
    """[(variant, wall ms, CPU ms)] for the captured (StepInputs, SamplingTensors) through variants of the step."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxpaged.attention import AttentionMetadata
    from jaxpaged.sampler import sample

    graphdef, opts, call, lm_head = _step_parts(runner)
    arrays, sampling, cache = _replay_args(runner, captured)
    state = runner.state
    results = []

    def time_step(name, opts_v):
        """A fresh jit of the engine's step with attention options `opts_v`."""
        fn = jax.jit(lambda st, kv, arr, smp: call(opts_v, st, kv, arr, smp), donate_argnums=(1,))
        cache[0], *out = fn(state, cache[0], arrays, sampling)   # compile
        jax.block_until_ready(out)
        ts, cs = [], []
        for _ in range(repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            cache[0], *out = fn(state, cache[0], arrays, sampling)
            jax.block_until_ready(out)
            ts.append(time.perf_counter() - t0)
            cs.append(time.process_time() - c0)
        results.append((name, 1e3 * float(np.median(ts)), 1e3 * float(np.median(cs))))

    time_step(f"full step (as the engine runs it, attention {opts.backend})", opts)
    # the other backend on the same cache (not over a uint16 bf16-bits cache: native only)
    for other in ("native", "pallas"):
        if (other != opts.backend and (other != "native" or jax.default_backend() == "cpu")
                and runner.kv_cache[0].dtype != jnp.uint16):
            time_step(f"full step, attention {other}", dataclasses_replace(opts, backend=other))
    time_step("no attention (no KV write, no read)", dataclasses_replace(opts, skip="all"))
    time_step("KV write only (no attention read)", dataclasses_replace(opts, skip="read"))

    def forward_only(state, kv, arrays):
        model = nnx.merge(graphdef, state)
        meta = AttentionMetadata(arrays["slot_mapping"], arrays["block_tables"], arrays["seq_lens"],
                                 arrays["query_start"])
        hidden, kv = model.forward(arrays["token_ids"], arrays["positions"], kv, meta, opts)
        return kv, jnp.take(hidden, arrays["logits_indices"], axis=0)

    fwd = jax.jit(forward_only, donate_argnums=(1,))
    cache[0], last = fwd(state, cache[0], arrays)
    ts, cs = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        cache[0], last = fwd(state, cache[0], arrays)
        jax.block_until_ready(last)
        ts.append(time.perf_counter() - t0)
        cs.append(time.process_time() - c0)
    results.append(("forward only (no LM head, no sampling)", 1e3 * float(np.median(ts)), 1e3 * float(np.median(cs))))

    head = jax.jit(lm_head)
    results.append(("LM head alone [B, H] -> [B, V]", *_median_ms(lambda: head(state, last), repeats, True)))
    logits = head(state, last)
    greedy = jax.jit(lambda lg, s: sample(lg, s, num_logprobs=None, use_penalties=False))
    results.append(("sampler alone, greedy", *_median_ms(lambda: greedy(logits, sampling), repeats, True)))
    b = logits.shape[0]
    full = results[0][1]
    for label, top_p, top_k in (("top_p 0.9", 0.9, 0), ("top_p 0.95 top_k 50", 0.95, 50)):
        sampled = dataclasses_replace(sampling, temperature=jnp.full((b,), 0.8, jnp.float32),
                                      top_p=jnp.full((b,), top_p, jnp.float32), top_k=jnp.full((b,), top_k, jnp.int32))
        results.append((f"sampler alone, temperature 0.8 {label}",
                        *_median_ms(lambda: greedy(logits, sampled), repeats, True)))
    # the sampler's share: its time against the full step's (wall ms), greedy and sampled
    for name, ms, _ in [r for r in results if r[0].startswith("sampler alone")]:
        results.append((f"  % of the full step: {name[len('sampler alone, '):]}", 100 * ms / full, float("nan")))
    return results


def print_ops(runner, captured, top: int, what: str) -> None:
    """The `top` longest XLA ops of the captured step as the engine runs it (op_profile.op_table)."""
    import jax

    from jaxpaged.bench.op_profile import op_table
    _, opts, call, _ = _step_parts(runner)
    arrays, sampling, cache = _replay_args(runner, captured)
    fn = jax.jit(lambda st, kv, arr, smp: call(opts, st, kv, arr, smp), donate_argnums=(1,))
    hlo = fn.lower(runner.state, cache[0], arrays, sampling).compile().as_text()

    def run():
        cache[0], *out = fn(runner.state, cache[0], arrays, sampling)
        jax.block_until_ready(out)
    run()                                                  # compile and warm up outside the trace
    rows = op_table(run, calls=3, hlo_text=hlo)
    print(f"  per-op profile, {what}: {sum(r[1] for r in rows):.2f} ms of ops per step")
    print(f"    {'ms/step':>9} {'per step':>8}  op (output shape, custom call target)")
    for name, ms, n in rows[:top]:
        print(f"    {ms:9.2f} {n:7.1f}x  {name}")


def _replay_args(runner, captured):
    """(arrays, sampling, [kv cache]) to replay a captured (StepInputs, SamplingTensors) step: device
    arrays, and a copy of the runner's cache in a one-item list (donated from call to call, so the
    runner's own cache is never written)."""
    import jax
    import jax.numpy as jnp
    inputs, sampling = captured
    keys = ("token_ids", "positions", "slot_mapping", "block_tables", "seq_lens", "query_start", "logits_indices")
    arrays = {k: jnp.asarray(getattr(inputs, k)) for k in keys}
    return arrays, jax.tree.map(jnp.asarray, sampling), [jax.tree.map(jnp.copy, runner.kv_cache)]


def _step_parts(runner):
    """(graphdef, opts, call(opts, state, kv, arrays, sampling)): a replica of the engine's step.

    Built from public pieces (the runner's graphdef and attention options, model.forward / logits,
    sampler.sample; greedy, no logprobs, no penalties), not from the runner's private jitted
    functions. It runs on the runner's own params (`runner.state`) and KV cache.
    """
    import jax.numpy as jnp
    from flax import nnx

    from jaxpaged.attention import AttentionMetadata
    from jaxpaged.sampler import sample

    graphdef, opts = runner.graphdef, runner.attention_options

    def call(opts_v, state, kv, arrays, sampling):
        model = nnx.merge(graphdef, state)
        meta = AttentionMetadata(arrays["slot_mapping"], arrays["block_tables"], arrays["seq_lens"],
                                 arrays["query_start"])
        hidden, kv = model.forward(arrays["token_ids"], arrays["positions"], kv, meta, opts_v)
        logits = lm_head(state, jnp.take(hidden, arrays["logits_indices"], axis=0))
        return kv, sample(logits, sampling, num_logprobs=None, use_penalties=False)

    def lm_head(state, x):
        """The model's LM head, in the runner's storage (packed under native matmuls)."""
        return nnx.merge(graphdef, state).logits(x)
    return graphdef, opts, call, lm_head


def dataclasses_replace(obj, **kw):
    import dataclasses
    return dataclasses.replace(obj, **kw)


# ---------------------------------------------------------------------------- main

def run(args) -> dict:
    import jax

    from jaxpaged import LLM

    sizes = [int(x) for x in args.batch_sizes.split(",")] if args.batch_sizes else [args.batch_size]
    load = os.getloadavg()
    print(f"load average {load[0]:.2f} {load[1]:.2f}; backend {jax.default_backend()}, {os.cpu_count()} cpus")
    report = {}
    if args.flops:
        rows = matmul_ceiling(args.repeats)
        report["matmul"] = rows
        print("matmul FLOP ceiling (jnp.dot, f32 accumulation):")
        for r in rows:
            print(f"  {r['dtype']:<9} {r['shape']:<16} {r['ms']:9.3f} ms  {r['gflops']:7.1f} GFLOP/s")
    ceiling = {d: max(r["gflops"] for r in report.get("matmul", []) if r["dtype"] == d)
               for d in ("float32", "bfloat16")} if args.flops else {}
    t0 = time.perf_counter()
    llm = LLM(args.model, dtype=args.dtype, max_num_seqs=args.max_num_seqs or max(max(sizes), 2),
              max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
              attention_backend=args.attention_backend, native_matmul=args.native_matmul,
              quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype, enforce_eager=True, seed=args.seed, download_dir=args.download_dir)
    print(f"engine start (load, no warmup: shapes compile on first use) {time.perf_counter() - t0:.1f} s; "
          f"buckets T={llm.llm_engine.runner.buckets.token_buckets} B={llm.llm_engine.runner.buckets.seq_buckets}")
    cfg = llm.llm_engine.model_config
    rows = []
    for bsz in sizes:
        decode, timer, cap = run_batch(llm, bsz, args, capture=args.breakdown or args.ops > 0)
        if not decode:
            print(f"B={bsz}: no steady decode steps (raise --output-len above --skip)")
            continue
        s = _split_line(decode)
        ctx = int(np.mean([r.context / r.num_seqs for r in decode]))
        flops = bsz * model_flops_per_token(cfg, ctx)
        r = dict(batch=bsz, padded=(decode[0].tokens_padded, decode[0].seqs_padded), steps=len(decode), **s,
                 gflops=flops / s["device"] / 1e6, tok_s=bsz / s["step"] * 1e3)
        if ceiling:
            r["of_ceiling"] = r["gflops"] / ceiling[args.dtype]
        rows.append(r)
        prefill = [x for x in timer.records if not x.is_decode]
        pf = _split_line(prefill) if prefill else None
        print(f"B={bsz:<4} (mean context {ctx}) decode step {s['step']:8.2f} ms = host {s['host']:6.2f} ms (schedule {s['schedule']:.2f}, "
              f"inputs {s['inputs']:.2f}, sampling inputs {s['sampling_inputs']:.2f}, other {s['other']:.2f}) "
              f"+ device {s['device']:8.2f} ms (CPU {s['device_cpu']:.1f} ms); padded (T, B)={r['padded']}; {r['tok_s']:.1f} tok/s; "
              f"{r['gflops']:.1f} GFLOP/s" + (f" = {100 * r['of_ceiling']:.0f}% of the {args.dtype} matmul ceiling"
                                              if ceiling else ""))
        if pf:
            print(f"       prefill steps: {len(prefill)}, mean {pf['step']:.1f} ms (device {pf['device']:.1f} ms)")
        if cap is not None:
            for label, captured in (("decode", cap.decode), ("prefill", cap.prefill)):
                if captured is None:
                    continue
                inp = captured[0]
                what = f"{label} step: {inp.num_tokens} tokens / {inp.num_seqs} seqs, padded T={len(inp.token_ids)} " \
                       f"B={len(inp.seq_lens)}, context {int(inp.seq_lens.sum())} tokens"
                if args.breakdown:
                    print(f"  device-step breakdown, {what}")
                    print(f"    {'variant':<58} {'wall ms':>9} {'CPU ms':>9}")
                    for name, ms, cpu in breakdown(llm.llm_engine.runner, captured, args.repeats):
                        print(f"    {name:<58} {ms:9.2f} {cpu:9.2f}")
                if args.ops > 0:
                    print_ops(llm.llm_engine.runner, captured, args.ops, what)
    report["decode"] = rows
    report["num_compiled"] = llm.llm_engine.runner.num_compiled()
    print(f"compiled step executables: {report['num_compiled']} (bucket table has "
          f"{len(llm.llm_engine.runner.buckets.pairs())} pairs); load average now {os.getloadavg()[0]:.2f}")
    return report
