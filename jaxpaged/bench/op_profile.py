"""Per-op time of a jitted step on XLA:CPU, from a `jax.profiler` trace.

XLA:CPU records one trace event per thunk it runs (a fusion, a custom call such as a native kernel,
a scatter), named after the HLO instruction. `op_table` traces a few calls of `run` (one step, blocked
on), sums each instruction's time per call, and labels it from the compiled HLO text (its output shape
and, for a custom call, the FFI target), so "ffi_call.31 f32[32,1536] jaxpaged_matmul" reads as the
gate projection of a 32-row step. The wrapper events (the executor, Python frames, the layer scan's
`while`) are left out: they contain the ops.
"""
from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import tempfile

import jax

_WRAPPERS = ("$", "ThunkExecutor", "PjitFunction", "while", "SlinkyThreadPool", "ParseArguments", "DevicePut",
             "CommonPjRtLoadedExecutable", "end: ")


def hlo_labels(hlo_text: str) -> dict[str, str]:
    """instruction name -> "shape [custom call target]" from a compiled module's text."""
    labels = {}
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (\S+) ", line)
        if m:
            target = re.search(r'custom_call_target="(\w+)"', line)
            labels[m.group(1)] = m.group(2) + (f" {target.group(1)}" if target else "")
    return labels


def op_table(run, calls: int = 3, hlo_text: str = "") -> list[tuple[str, float, float]]:
    """[(op label, ms per call, occurrences per call)], longest first, over `calls` traced calls of
    `run()` (which must run one step and block until it is done)."""
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d, create_perfetto_trace=True)
        try:
            for _ in range(calls):
                run()
        finally:
            jax.profiler.stop_trace()
        files = glob.glob(os.path.join(d, "**", "*.trace.json.gz"), recursive=True)
        if not files:
            raise RuntimeError("jax.profiler wrote no perfetto trace")
        with gzip.open(sorted(files)[-1]) as f:
            events = json.load(f)["traceEvents"]
    total, count = collections.defaultdict(float), collections.Counter()
    for e in events:
        if e.get("ph") == "X" and not e["name"].startswith(_WRAPPERS):
            total[e["name"]] += e["dur"]          # microseconds
            count[e["name"]] += 1
    labels = hlo_labels(hlo_text)
    rows = [(f"{name} {labels.get(name, '')}".strip(), us / calls / 1e3, count[name] / calls)
            for name, us in total.items()]
    return sorted(rows, key=lambda r: -r[1])
