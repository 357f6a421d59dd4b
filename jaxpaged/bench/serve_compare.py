"""The side-by-side table of `bench serve --backend A,B`: per rate, per backend, and A/B ratios of p50 TTFT and TPOT.

Input: {backend: [summary per rate]} with summaries from serve.summarize (ms stats under ttft_ms, tpot_ms,
itl_ms; output_throughput in tok/s), every backend run on the same rates in the same order. A ratio
below 1.0 means the first backend is faster (lower latency) than the other.
"""
from __future__ import annotations


def rate_label(rate: float) -> str:
    return "inf" if rate == float("inf") else f"{rate:g}"


def p50_ratio(a: dict, b: dict, key: str) -> float | None:
    """a's p50 of `key` (e.g. "ttft_ms") over b's; None when either is missing or b's is 0."""
    x, y = a[key]["p50"], b[key]["p50"]
    if x is None or y is None or y == 0:
        return None
    return x / y


def ratios(results: dict[str, list[dict]]) -> list[dict]:
    """[{rate, pair: "A/B", ttft, tpot}] of the first backend against each other one, per rate."""
    names = list(results)
    first, out = names[0], []
    for other in names[1:]:
        for a, b in zip(results[first], results[other]):
            if a["rate"] != b["rate"]:
                raise ValueError(f"backends ran different rates: {a['rate']} vs {b['rate']}")
            out.append(dict(rate=a["rate"], pair=f"{first}/{other}", ttft=p50_ratio(a, b, "ttft_ms"),
                            tpot=p50_ratio(a, b, "tpot_ms")))
    return out


def _pair(stats: dict) -> str:
    return "n/a" if stats["p50"] is None else f"{stats['p50']:.0f} / {stats['p99']:.0f}"


def _x(r: float | None) -> str:
    return "n/a" if r is None else f"{r:.2f}x"


def format_table(results: dict[str, list[dict]]) -> str:
    """A markdown table: one row per (rate, backend), then one ratio row per rate and other backend."""
    lines = ["| rate (req/s) | backend | ok/failed | req/s | output tok/s | TTFT p50 / p99 ms | TPOT p50 / p99 ms "
             "| ITL p50 / p99 ms | p50 TTFT ratio | p50 TPOT ratio |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    by_rate = {}
    for rr in ratios(results):
        by_rate.setdefault(rr["rate"], []).append(rr)
    first = next(iter(results.values()))
    for i, row0 in enumerate(first):
        rate = row0["rate"]
        for name, rows in results.items():
            s = rows[i]
            lines.append(f"| {rate_label(rate)} | {name} | {s['completed']}/{s['failed']} | "
                         f"{s['request_throughput']:.2f} | {s['output_throughput']:.1f} | {_pair(s['ttft_ms'])} | "
                         f"{_pair(s['tpot_ms'])} | {_pair(s['itl_ms'])} | | |")
        for rr in by_rate.get(rate, []):
            lines.append(f"| {rate_label(rate)} | {rr['pair']} | | | | | | | {_x(rr['ttft'])} | {_x(rr['tpot'])} |")
    return "\n".join(lines)


def verdict(results: dict[str, list[dict]]) -> str:
    """One line: is the first backend's p50 TTFT and TPOT no worse (ratio <= 1) at every rate?"""
    rs = ratios(results)
    if not rs:
        return ""
    worse = [f"{rate_label(r['rate'])} ({r['pair']}: " + ", ".join(
        f"{k.upper()} {_x(r[k])}" for k in ("ttft", "tpot") if r[k] is None or r[k] > 1.0) + ")"
        for r in rs if any(r[k] is None or r[k] > 1.0 for k in ("ttft", "tpot"))]
    first = next(iter(results))
    if not worse:
        return f"{first} p50 TTFT and TPOT no worse than the other backends' at every rate"
    return f"{first} p50 TTFT or TPOT worse (or missing) at rate " + "; ".join(worse)
