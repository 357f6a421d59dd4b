"""Throughput-vs-latency PNGs from `bench serve` results (one point per request rate); matplotlib, lazily.

plot_serve: one server's rates; plot_serve_compare: several backends (`bench serve --backend A,B`), one
colour per backend, p50 solid and p99 dashed.

    python -m jaxpaged.bench.plot serve.jsonl out.png      # JSON lines written by `bench serve --output-json`
                                                           # (rows with a "backend": side by side)
"""
from __future__ import annotations

import json
import sys


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("plotting needs matplotlib: pip install 'jaxpaged[bench]' (or pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_serve(rows: list[dict], path: str, title: str = "jaxpaged serve: throughput vs latency") -> None:
    plt = _pyplot()

    rows = sorted(rows, key=lambda r: r["output_throughput"])
    x = [r["output_throughput"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for key, label in (("ttft_ms", "TTFT"), ("e2e_ms", "end-to-end")):
        for stat, style in (("p50", "-o"), ("p99", "--s")):
            ax1.plot(x, [r[key][stat] / 1e3 for r in rows], style, label=f"{label} {stat}")
    ax2.plot(x, [r["tpot_ms"]["p50"] for r in rows], "-o", label="TPOT p50")
    ax2.plot(x, [r["itl_ms"]["p99"] for r in rows], "--s", label="ITL p99")
    for r, xi in zip(rows, x):
        rate = "inf" if r["rate"] == float("inf") else f"{r['rate']:g}"
        ax1.annotate(f"{rate} req/s", (xi, r["e2e_ms"]["p50"] / 1e3), fontsize=7, textcoords="offset points",
                     xytext=(3, 3))
    ax1.set(xlabel="output tokens/s", ylabel="seconds", title="request latency")
    ax2.set(xlabel="output tokens/s", ylabel="ms", title="per-token latency")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_serve_compare(results: dict[str, list[dict]], path: str,
                       title: str = "bench serve: latency per request rate, side by side") -> None:
    """TTFT, TPOT, ITL (p50 solid, p99 dashed) and output tok/s against the offered request rate (one tick
    per rate, inf = all at once), one colour per backend."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.4))
    panels = (("ttft_ms", "TTFT", 1e3, "seconds"), ("tpot_ms", "TPOT", 1.0, "ms"), ("itl_ms", "ITL", 1.0, "ms"))
    rates = sorted({r["rate"] for rows in results.values() for r in rows})
    labels = ["inf" if x == float("inf") else f"{x:g}" for x in rates]
    for k, (name, rows) in enumerate(results.items()):
        color = f"C{k}"
        rows = sorted(rows, key=lambda r: r["rate"])
        x = [rates.index(r["rate"]) for r in rows]
        for ax, (key, label, div, _) in zip(axes, panels):
            for stat, style in (("p50", "-o"), ("p99", "--s")):
                y = [float("nan") if r[key][stat] is None else r[key][stat] / div for r in rows]
                ax.plot(x, y, style, color=color, label=f"{name} {stat}")
        axes[3].plot(x, [r["output_throughput"] for r in rows], "-o", color=color, label=name)
    for ax, (_, label, _, unit) in zip(axes, panels + ((None, "output throughput", None, "tokens/s"),)):
        ax.set(xlabel="request rate (req/s)", ylabel=unit, title=label)
        ax.set_xticks(range(len(rates)), labels)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        lines = [json.loads(l) for l in f if l.strip()]
    if any("backend" in r for r in lines):        # `bench serve --backend A,B --output-json`
        grouped: dict[str, list[dict]] = {}
        for r in lines:
            grouped.setdefault(r.get("backend", "?"), []).append(r)
        plot_serve_compare(grouped, sys.argv[2])
    else:
        plot_serve(lines, sys.argv[2])
