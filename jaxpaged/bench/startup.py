"""`bench startup`: cold start (an empty cache root) vs warm start (everything cached), offline or as a server.

    python -m jaxpaged.bench startup                 # LLM(...) in a fresh process: cold, then warm
    python -m jaxpaged.bench startup --server        # python -m jaxpaged.server: to /health 200 and a first answer

Cold means a fresh temporary $JAXPAGED_CACHE: no converted params, no packed weights, no native kernel
build (g++), no compiled executables. Warm is a second start on the same root. Each start is a fresh
Python process. Offline it builds LLM(...) with warmup (every step shape in the bucket table) and runs one
short generate, reporting import, load (convert or cache hit, packing), compile (warmup) and first-request
times, the executables compiled, the persistent compilation cache's hits and misses, and the weights packed
vs read from the packed cache. `--server` starts the server and reports the time to /health 200, to the
first completion, and to the end of its background warmup (the server compiles the smallest step shape
before /health answers and the other bucket shapes in a thread while it serves; its log line "background
warmup done" marks the end; the server's stderr, progress bars included, is passed through to this
terminal's). `--enforce-eager` starts without warmup:
the shapes are traced, and read from the persistent compilation cache when warm, at their first step (a
shorter start; the first steps of each new shape pay that instead).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
from jaxpaged import LLM, SamplingParams
from jaxpaged.compilation_cache import cache_stats
import cpu_kernels.matmul as matmul
t1 = time.perf_counter()
cfg = json.loads(sys.argv[1])
eager = cfg.pop("eager")
llm = LLM(cfg.pop("model"), enforce_eager=True, **cfg)
t2 = time.perf_counter()
runner = llm.llm_engine.runner
if not eager:
    runner.warmup(progress=False)
t3 = time.perf_counter()
llm.generate([[100, 200, 300]], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)
t4 = time.perf_counter()
packed = runner.packed_cache
print("RESULT " + json.dumps(dict(import_s=t1 - t0, load_s=t2 - t1, compile_s=t3 - t2, first_request_s=t4 - t3,
                                  total_s=t4 - t0, compiled=runner.num_compiled(), xla_cache=cache_stats(),
                                  packed=matmul.pack_count(), packed_hits=packed.hits if packed else 0)))
"""


def add_args(p) -> None:
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--cache-dir", default=None, help="cache root to use (default: a fresh temporary dir)")
    p.add_argument("--warm-only", action="store_true", help="one start with the given (existing) cache")
    p.add_argument("--server", action="store_true", help="start `python -m jaxpaged.server` instead of LLM(...)")
    p.add_argument("--enforce-eager", action="store_true",
                   help="no warmup: each step shape is traced (and read from the persistent cache, or compiled) "
                        "at its first step, i.e. lazily")


def _env(cache_dir: str) -> dict:
    # the cache root for everything: converted params, packed weights, XLA executables, the g++ build
    return {**os.environ, "JAXPAGED_CACHE": cache_dir}


def start_once(args, cache_dir: str) -> dict:
    cfg = dict(model=args.model, dtype=args.dtype, max_num_seqs=args.max_num_seqs,
               max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
               download_dir=cache_dir, compilation_cache_dir=os.path.join(cache_dir, "xla"), eager=args.enforce_eager)
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(cfg)], capture_output=True, text=True,
                          env=_env(cache_dir))
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"start failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_once(args, cache_dir: str, timeout: float = 900) -> dict:
    """Starts the server on a fresh port; seconds to /health 200 and to a first completion."""
    import httpx

    port = _free_port()
    cmd = [sys.executable, "-m", "jaxpaged.server", "--model", args.model, "--host", "127.0.0.1", "--port", str(port),
           "--dtype", args.dtype, "--max-num-seqs", str(args.max_num_seqs),
           "--max-num-batched-tokens", str(args.max_num_batched_tokens), "--max-model-len", str(args.max_model_len),
           "--disable-uvicorn-access-log"] + (["--enforce-eager"] if args.enforce_eager else [])
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=_env(cache_dir), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, errors="replace")
    warmup_done = threading.Event()
    marks: dict[str, float] = {}

    def relay():        # the server's stderr to ours; notes when its background warmup ends
        for line in proc.stderr:
            sys.stderr.write(line)
            if "background warmup done" in line and not warmup_done.is_set():
                marks["warmup_done_s"] = time.perf_counter() - t0
                warmup_done.set()
    threading.Thread(target=relay, daemon=True).start()
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(timeout=60) as client:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"server exited with {proc.returncode} before /health answered")
                if time.perf_counter() - t0 > timeout:
                    raise RuntimeError(f"no /health 200 within {timeout} s")
                try:
                    if client.get(base + "/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
            health_s = time.perf_counter() - t0
            r = client.post(base + "/v1/completions", json=dict(model=args.model, prompt="The capital of France is",
                                                                max_tokens=4, temperature=0.0))
            r.raise_for_status()
            first_s = time.perf_counter() - t0
        if not args.enforce_eager:
            warmup_done.wait(max(0.0, timeout - (time.perf_counter() - t0)))
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return dict(health_s=health_s, first_completion_s=first_s, warmup_done_s=marks.get("warmup_done_s"))


def _fmt(name, r):
    if "health_s" in r:
        done = r.get("warmup_done_s")
        return (f"{name:<5} server: /health 200 after {r['health_s']:6.1f} s, first completion after "
                f"{r['first_completion_s']:6.1f} s, background warmup done after "
                + (f"{done:6.1f} s" if done is not None else "- (none)"))
    return (f"{name:<5} total {r['total_s']:6.1f} s  (import {r['import_s']:.1f}, load {r['load_s']:.1f}, "
            f"compile {r['compile_s']:.1f}, first request {r['first_request_s']:.2f}); "
            f"{r['compiled']} executables, XLA cache {r['xla_cache']['hits']} hits / {r['xla_cache']['misses']} "
            f"misses; weights packed {r['packed']}, "
            f"read packed {r['packed_hits']}")


def run(args) -> list[dict]:
    print(f"load average {os.getloadavg()[0]:.2f}")
    once = serve_once if args.server else start_once
    if args.warm_only:
        r = once(args, args.cache_dir or os.environ.get("JAXPAGED_CACHE")
                 or os.path.join(os.path.expanduser("~"), ".cache", "jaxpaged"))
        print(_fmt("warm", r))
        return [r]
    root = args.cache_dir or tempfile.mkdtemp(prefix="jaxpaged-startup-")
    print(f"cache root {root}")
    cold = once(args, root)
    print(_fmt("cold", cold), flush=True)
    warm = once(args, root)
    print(_fmt("warm", warm))
    return [cold, warm]
