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
"""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
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
    p.add_argument("--request-rates", default="inf", help="comma-separated requests/s; inf = all at once")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--launch", action="store_true", help="start `python -m jaxpaged.server` for the run")
    p.add_argument("--server-args", default="", help="extra server flags with --launch (one string)")
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


def _launch(args):
    import httpx
    port = args.base_url.rstrip("/").rsplit(":", 1)[-1]
    cmd = [sys.executable, "-m", "jaxpaged.server", "--model", args.model, "--port", port,
           "--uvicorn-log-level", "warning"] + args.server_args.split()
    if args.served_model_name:
        cmd += ["--served-model-name", args.served_model_name]
    proc = subprocess.Popen(cmd)
    deadline = time.time() + 1800
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {' '.join(cmd)}")
        try:
            if httpx.get(args.base_url.rstrip("/") + "/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.terminate()
    raise RuntimeError("server did not become healthy in 30 min")


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


def run(args) -> list[dict]:
    api_key = args.api_key or os.environ.get("OPENAI_API_KEY") or os.environ.get("JAXPAGED_API_KEY") or None
    server = _launch(args) if args.launch else None
    try:
        tokenizer, vocab_size = tokenizer_and_vocab(args.tokenizer or args.model)
        seed = args.seed
        requests = workload.build_requests(args, tokenizer, vocab_size)
        name = args.served_model_name or served_name(args.base_url, api_key)
        print(f"server model {name}; {workload.summary(requests)}; load average {os.getloadavg()[0]:.2f}")
        rows = []
        for i, rate in enumerate(float(x) for x in args.request_rates.split(",")):
            if i and not args.dataset:
                # fresh random prompts per rate: repeating them would hit the server's prefix cache
                args.seed = seed + i
                requests = workload.build_requests(args, tokenizer, vocab_size)
            s = asyncio.run(run_rate(args.base_url, name, requests, rate, max_concurrency=args.max_concurrency,
                                     seed=seed, ignore_eos=args.ignore_eos, timeout=args.timeout,
                                     api_key=api_key))
            s["load_avg"] = os.getloadavg()[0]
            rows.append(s)
            print(format_summary(s), flush=True)
            if args.output_json:
                with open(args.output_json, "a") as f:
                    f.write(json.dumps(s) + "\n")
        if args.plot:
            from jaxpaged.bench.plot import plot_serve
            plot_serve(rows, args.plot)
            print(f"plot written to {args.plot}")
        return rows
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=60)
