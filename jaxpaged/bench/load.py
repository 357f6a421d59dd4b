"""`bench load`: many concurrent streams against a running server, some aborted by the client midway.

    python -m jaxpaged.server --port 8000 &
    python -m jaxpaged.bench load --base-url http://127.0.0.1:8000 --concurrency 128 --num-requests 512 \
        --abort-fraction 0.25 --output-len-range 64:256

`--concurrency` workers each stream one request at a time (streamed /v1/chat/completions, or
/v1/completions with `--endpoint completions`) until `--num-requests` have been sent. Prompts are
random words (no tokenizer needed here), lengths from `--input-len-range` words. A seeded choice
marks `--abort-fraction` of the requests to be closed by the client once a random number of tokens
(fewer than their max_tokens; counted by the streamed usage) has arrived, as a user who stops
reading would.

Reported: answered (reached [DONE]), aborted (closed by us), rejected (429: the server's queue was
full), errors (anything else: another status, an error event, a broken connection); output tokens
per second of the answered requests (their usage); TTFT p50/p99; from the server's /metrics while
the load runs: the peak KV-cache usage and the peak resident memory (process_resident_memory_bytes),
and after the load, once no request is running or waiting, the KV-cache usage (0 means every block
of the finished and aborted requests was freed) and the resident memory.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from dataclasses import dataclass

import numpy as np

from jaxpaged.bench.workload import parse_range

_WORDS = ("the paged cache keeps every block of a sequence in a table so the scheduler can grow and free "
          "them one at a time while many requests share the same batch and the server answers each stream "
          "as soon as its next token is ready").split()
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")


@dataclass(frozen=True)
class LoadRequest:
    prompt: str
    max_tokens: int
    abort_after: int | None     # close the stream once this many tokens arrived; None: read to the end


def add_args(p) -> None:
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="model name sent (default: the server's first)")
    p.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY' (a server with --api-key)")
    p.add_argument("--endpoint", choices=["chat", "completions"], default="chat")
    p.add_argument("--concurrency", type=int, default=64, help="streams open at once")
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--abort-fraction", type=float, default=0.25, help="share of requests the client closes midway")
    p.add_argument("--input-len-range", default="8:64", help="prompt length in words, N or LO:HI")
    p.add_argument("--output-len-range", default="16:128", help="max_tokens, N or LO:HI")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--idle-timeout", type=float, default=120, help="seconds to wait for the server to go idle after")
    p.add_argument("--launch", action="store_true", help="start `python -m jaxpaged.server` for the run")
    p.add_argument("--server-args", default="", help="extra server flags with --launch (one string)")
    p.add_argument("--output-json", default=None, help="append the report as one JSON line")


def build_load(num: int, input_len: tuple[int, int], output_len: tuple[int, int], abort_fraction: float,
               seed: int = 0) -> list[LoadRequest]:
    """The seeded request list: prompt words, max_tokens, and which requests are aborted after how many chunks."""
    if not 0.0 <= abort_fraction <= 1.0:
        raise ValueError(f"abort_fraction must be in [0, 1], got {abort_fraction}")
    rng = np.random.default_rng(seed)
    out = []
    for i in range(num):
        words = rng.choice(_WORDS, size=int(rng.integers(input_len[0], input_len[1] + 1)))
        max_tokens = int(rng.integers(output_len[0], output_len[1] + 1))
        abort_after = None
        if rng.random() < abort_fraction and max_tokens >= 2:
            abort_after = int(rng.integers(1, max_tokens))     # 1 .. max_tokens - 1 tokens: before the end
        out.append(LoadRequest(f"Request {i}: " + " ".join(words), max_tokens, abort_after))
    return out


def parse_metrics(text: str) -> dict[str, float]:
    """{"name": value} of a Prometheus text page, summed over label sets."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line.strip())
        if m:
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(3))
    return out


async def _one(client, url: str, model: str, endpoint: str, req: LoadRequest) -> dict:
    if endpoint == "chat":
        body = dict(model=model, messages=[{"role": "user", "content": req.prompt}])
    else:
        body = dict(model=model, prompt=req.prompt)
    body.update(max_tokens=req.max_tokens, temperature=0.0, ignore_eos=True, stream=True,
                stream_options={"include_usage": True, "continuous_usage_stats": True})
    t0 = time.perf_counter()
    ttft, chunks, tokens = None, 0, 0
    try:
        async with client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                await resp.aread()
                kind = "rejected" if resp.status_code == 429 else "error"
                return dict(kind=kind, error=f"HTTP {resp.status_code}: {resp.text[:200]}")
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    return dict(kind="answered", ttft=ttft, chunks=chunks, tokens=tokens,
                                e2e=time.perf_counter() - t0)
                data = json.loads(line[6:])
                if "error" in data:
                    return dict(kind="error", error=str(data["error"])[:200])
                if data.get("usage"):
                    tokens = data["usage"]["completion_tokens"]      # cumulative (continuous_usage_stats)
                if any(_has_text(c) for c in data.get("choices", ())):
                    chunks += 1
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                # tokens reach max_tokens > abort_after before [DONE], so a planned abort always happens
                if req.abort_after is not None and tokens >= req.abort_after:
                    return dict(kind="aborted", ttft=ttft, chunks=chunks)   # leaving the block closes it
        return dict(kind="error", error="stream ended without [DONE]")
    except Exception as e:  # noqa: BLE001 - a failed request is counted, not fatal
        return dict(kind="error", error=f"{type(e).__name__}: {e}")


def _has_text(choice: dict) -> bool:
    return bool(choice.get("text") or (choice.get("delta") or {}).get("content"))


async def _watch(client, metrics_url: str, peaks: dict, stop: asyncio.Event) -> None:
    """Samples /metrics every 0.25 s while the load runs, keeping the peaks."""
    while not stop.is_set():
        try:
            m = parse_metrics((await client.get(metrics_url)).text)
            for key in ("jaxpaged:kv_cache_usage_perc", "process_resident_memory_bytes",
                        "jaxpaged:num_requests_running", "jaxpaged:num_requests_waiting"):
                peaks[key] = max(peaks.get(key, 0.0), m.get(key, 0.0))
        except Exception:  # noqa: BLE001 - a missed sample is not a failure
            pass
        try:
            await asyncio.wait_for(stop.wait(), 0.25)
        except asyncio.TimeoutError:
            pass


async def _idle_metrics(client, metrics_url: str, timeout: float) -> tuple[dict, float]:
    """/metrics once nothing is running or waiting (or at the timeout), and how long that took."""
    t0 = time.perf_counter()
    while True:
        m = parse_metrics((await client.get(metrics_url)).text)
        idle = m.get("jaxpaged:num_requests_running", 0) == 0 and m.get("jaxpaged:num_requests_waiting", 0) == 0
        if (idle and m.get("jaxpaged:kv_cache_usage_perc", 0) == 0) or time.perf_counter() - t0 > timeout:
            return m, time.perf_counter() - t0
        await asyncio.sleep(0.1)


async def run_load(base_url: str, requests: list[LoadRequest], *, concurrency: int, model: str | None = None,
                   endpoint: str = "chat", timeout: float = 3600.0, idle_timeout: float = 120.0,
                   api_key: str | None = None) -> dict:
    import httpx

    base = base_url.rstrip("/")
    url = base + ("/v1/chat/completions" if endpoint == "chat" else "/v1/completions")
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    async with httpx.AsyncClient(timeout=timeout, limits=limits, headers=headers) as client:
        model = model or (await client.get(base + "/v1/models")).json()["data"][0]["id"]
        before = parse_metrics((await client.get(base + "/metrics")).text)
        todo = list(reversed(requests))
        results: list[dict] = []

        async def worker():
            while todo:
                results.append(await _one(client, url, model, endpoint, todo.pop()))

        peaks: dict = {}
        stop = asyncio.Event()
        watcher = asyncio.ensure_future(_watch(client, base + "/metrics", peaks, stop))
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(max(1, concurrency))))
        duration = time.perf_counter() - t0
        stop.set()
        await watcher
        after, idle_s = await _idle_metrics(client, base + "/metrics", idle_timeout)
    return summarize(results, duration, concurrency, before, peaks, after, idle_s)


def summarize(results: list[dict], duration: float, concurrency: int, before: dict, peaks: dict, after: dict,
              idle_s: float) -> dict:
    by_kind = {k: [r for r in results if r["kind"] == k] for k in ("answered", "aborted", "rejected", "error")}
    ttfts = [r["ttft"] for r in results if r.get("ttft") is not None]
    tokens = sum(r.get("tokens", 0) for r in by_kind["answered"])
    mb = 1 / 2 ** 20
    return dict(
        concurrency=concurrency, requests=len(results), duration_s=duration,
        answered=len(by_kind["answered"]), aborted=len(by_kind["aborted"]), rejected=len(by_kind["rejected"]),
        errors=len(by_kind["error"]), error_samples=[r["error"] for r in by_kind["error"]][:3],
        output_tokens_answered=tokens, output_tok_per_s=tokens / duration if duration else 0.0,
        ttft_ms_p50=float(np.percentile(ttfts, 50) * 1e3) if ttfts else None,
        ttft_ms_p99=float(np.percentile(ttfts, 99) * 1e3) if ttfts else None,
        kv_usage_peak=peaks.get("jaxpaged:kv_cache_usage_perc"),
        kv_usage_after=after.get("jaxpaged:kv_cache_usage_perc"),
        running_after=after.get("jaxpaged:num_requests_running"),
        waiting_after=after.get("jaxpaged:num_requests_waiting"),
        blocks_freed=after.get("jaxpaged:kv_cache_usage_perc") == 0.0, idle_after_s=idle_s,
        rss_mb_before=before.get("process_resident_memory_bytes", 0.0) * mb,
        rss_mb_peak=peaks.get("process_resident_memory_bytes", 0.0) * mb,
        rss_mb_after=after.get("process_resident_memory_bytes", 0.0) * mb)


def format_report(s: dict) -> str:
    def ms(x):
        return "n/a" if x is None else f"{x:.0f}"
    return (f"{s['requests']} requests, {s['concurrency']} concurrent, {s['duration_s']:.1f} s: "
            f"{s['answered']} answered, {s['aborted']} aborted, {s['rejected']} rejected (429), "
            f"{s['errors']} errors {s['error_samples'] or ''}\n"
            f"  {s['output_tok_per_s']:.1f} output tok/s (answered requests); TTFT p50/p99 {ms(s['ttft_ms_p50'])}/"
            f"{ms(s['ttft_ms_p99'])} ms\n"
            f"  KV cache usage: peak {_pct(s['kv_usage_peak'])}, after {_pct(s['kv_usage_after'])} "
            f"({'all blocks freed' if s['blocks_freed'] else 'BLOCKS STILL HELD'}, "
            f"idle after {s['idle_after_s']:.1f} s)"
            f"\n  server RSS: {s['rss_mb_before']:.0f} MB before, {s['rss_mb_peak']:.0f} MB peak, "
            f"{s['rss_mb_after']:.0f} MB after")


def _pct(fraction) -> str:
    return "n/a" if fraction is None else f"{100 * fraction:.1f}%"


def run(args) -> dict:
    from jaxpaged.bench.serve_launch import launch_jaxpaged

    requests = build_load(args.num_requests, parse_range(args.input_len_range), parse_range(args.output_len_range),
                          args.abort_fraction, args.seed)
    with contextlib.ExitStack() as stack:
        if args.launch:     # stopped on the way out, also on an error or Ctrl-C
            args.model = args.model or "smollm2-135m-instruct"
            stack.enter_context(launch_jaxpaged(args.model, args.base_url, args.server_args))
        report = asyncio.run(run_load(args.base_url, requests, concurrency=args.concurrency, model=args.model,
                                      endpoint=args.endpoint, timeout=args.timeout, idle_timeout=args.idle_timeout,
                                      api_key=args.api_key))
    print(format_report(report), flush=True)
    if args.output_json:
        with open(args.output_json, "a") as f:
            f.write(json.dumps(report) + "\n")
    return report
