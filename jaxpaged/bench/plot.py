"""Throughput-vs-latency PNG from `bench serve` results (one point per request rate); matplotlib, lazily.

    python -m jaxpaged.bench.plot serve.jsonl out.png      # JSON lines written by `bench serve --output-json`
"""
from __future__ import annotations

import json
import sys


def plot_serve(rows: list[dict], path: str, title: str = "jaxpaged serve: throughput vs latency") -> None:
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("plotting needs matplotlib: pip install 'jaxpaged[bench]' (or pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        plot_serve([json.loads(l) for l in f if l.strip()], sys.argv[2])
