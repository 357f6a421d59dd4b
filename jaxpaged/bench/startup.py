"""`bench startup`: cold start (empty converted-params and compilation caches) vs warm start (both cached).

Each start runs in a fresh Python process (`python -c`), building LLM(...) with warmup (every step
shape in the bucket table compiled) and one short generate; it reports import, model load (convert
or cache hit), compile (warmup) and first-request times, and the number of compiled executables.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
from jaxpaged import LLM, SamplingParams
t1 = time.perf_counter()
cfg = json.loads(sys.argv[1])
llm = LLM(cfg.pop("model"), enforce_eager=True, **cfg)
t2 = time.perf_counter()
llm.llm_engine.runner.warmup(progress=False)
t3 = time.perf_counter()
llm.generate([[100, 200, 300]], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)
t4 = time.perf_counter()
print("RESULT " + json.dumps(dict(import_s=t1 - t0, load_s=t2 - t1, compile_s=t3 - t2, first_request_s=t4 - t3,
                                  total_s=t4 - t0, compiled=llm.llm_engine.runner.num_compiled(),
                                  from_cache=None)))
"""


def add_args(p) -> None:
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--cache-dir", default=None, help="cache root to use (default: a fresh temporary dir)")
    p.add_argument("--warm-only", action="store_true", help="one start with the given (existing) cache")


def start_once(args, cache_dir: str) -> dict:
    cfg = dict(model=args.model, dtype=args.dtype, max_num_seqs=args.max_num_seqs,
               max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
               download_dir=cache_dir, compilation_cache_dir=os.path.join(cache_dir, "xla"))
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(cfg)], capture_output=True, text=True)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"start failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def _fmt(name, r):
    return (f"{name:<5} total {r['total_s']:6.1f} s  (import {r['import_s']:.1f}, load {r['load_s']:.1f}, "
            f"compile {r['compile_s']:.1f}, first request {r['first_request_s']:.2f}); "
            f"{r['compiled']} executables")


def run(args) -> list[dict]:
    print(f"load average {os.getloadavg()[0]:.2f}")
    if args.warm_only:
        r = start_once(args, args.cache_dir)
        print(_fmt("warm", r))
        return [r]
    root = args.cache_dir or tempfile.mkdtemp(prefix="jaxpaged-startup-")
    cold = start_once(args, root)
    print(_fmt("cold", cold), flush=True)
    warm = start_once(args, root)
    print(_fmt("warm", warm))
    return [cold, warm]
