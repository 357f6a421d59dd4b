"""`bench memory`: where an engine's resident memory goes, stage by stage (the process's RSS).

    python -m jaxpaged.bench memory [--model smollm2-135m-instruct] [--dtype float32] [--engine-args JSON]

Stages, each measured as the growth of this process's resident set (VmRSS) over the previous one:
  runtime   Python, JAX (CPU client), transformers, the server's modules
  engine    LLM(..., enforce_eager=True): the params as device arrays (with any packed copies), the
            KV pool, the tokenizer, and what the load left in the allocator; split below by array sizes
  compile   warmup(): the step executables of every bucket (what an idle server holds after start)
  serve     one short greedy request
The engine's arrays are also listed by size (KV pool, params in the backend's storage forms, every
live JAX array), so a copy held somewhere, and the part of the engine stage that is not arrays, show. Run it on an otherwise idle machine; RSS is a process total.
"""
from __future__ import annotations

import json

MiB = float(1 << 20)


def add_args(p) -> None:
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--engine-args", default="{}", help='more EngineConfig fields as JSON, e.g. \'{"max_num_seqs": 8}\'')
    p.add_argument("--no-warmup", action="store_true", help="skip the compile stage")


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _nbytes(tree) -> int:
    from jax.tree_util import tree_leaves
    return sum(int(getattr(x, "nbytes", 0)) for x in tree_leaves(tree))


def measure(model: str, dtype: str, engine_args: dict, warmup: bool = True) -> dict:
    stages, last = {}, 0

    def mark(name: str) -> None:
        nonlocal last
        now = rss_bytes()
        stages[name] = now - last
        last = now

    import jax
    import transformers  # noqa: F401

    import jaxpaged.server.app  # noqa: F401
    from jaxpaged import LLM, SamplingParams
    jax.numpy.zeros(1).block_until_ready()       # the CPU client up
    mark("runtime")
    llm = LLM(model, dtype=dtype, enforce_eager=True, **engine_args)
    mark("engine")
    runner = llm.llm_engine.runner
    # params as the runner holds them: the backend's storage forms (packed weights, quantized ones, ...)
    arrays = {"kv_pool": _nbytes(runner.kv_cache), "params (as the runner holds them)": _nbytes(runner.state)}
    # every JAX array alive (params and KV pool included): more than the above = a copy held somewhere
    arrays["all live JAX arrays"] = sum(int(x.nbytes) for x in jax.live_arrays())
    if warmup:
        runner.warmup(progress=False)
        mark("compile")
    llm.generate([[100, 200, 300]], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)
    mark("serve")
    return {"stages": stages, "arrays": arrays, "total_rss": last,
            "kv_plan": llm.llm_engine.kv_plan.__dict__, "native_matmul": runner.native_matmul}


def format_report(r: dict) -> str:
    lines = ["| stage | RSS growth (MiB) |", "|---|---|"]
    lines += [f"| {k} | {v / MiB:.0f} |" for k, v in r["stages"].items()]
    lines += [f"| **total** | **{r['total_rss'] / MiB:.0f}** |", "", "| engine array | MiB |", "|---|---|"]
    lines += [f"| {k} | {v / MiB:.0f} |" for k, v in r["arrays"].items()]
    rest = r["stages"]["engine"] - r["arrays"]["all live JAX arrays"]
    lines += [f"| engine stage, not in JAX arrays | {rest / MiB:.0f} |"]
    plan = r["kv_plan"]
    lines += ["", f"KV pool: {plan['num_blocks']} blocks of {plan['block_size']} tokens (sized by {plan['sized_by']}), "
                  f"max_model_len {plan['max_model_len']}; native matmul: {r['native_matmul']}"]
    return "\n".join(lines)


def run(args) -> dict:
    r = measure(args.model, args.dtype, json.loads(args.engine_args), warmup=not args.no_warmup)
    print(format_report(r))
    return r
