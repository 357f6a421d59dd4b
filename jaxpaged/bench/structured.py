"""`bench structured`: the cost of structured output on a decode step: B rows all constrained vs none.

One engine (warmed up), two runs of B requests with the same prompts and lengths (ignore_eos, so every
step is a full B-row decode step once the prompts are in): unconstrained, then every row under a JSON
schema. Reports the median decode-step time of each, their ratio (issue 15's bar: <= 1.15), and the host
time of one B-row mask build (llguidance, parallel executor) on its own.
"""
from __future__ import annotations

import statistics
import time

SCHEMA = {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "string"}}},
          "required": ["items"]}


def add_args(p) -> None:
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=64, help="decode steps timed per run")
    p.add_argument("--download-dir", default=None, help="cache of converted parameters")
    p.add_argument("--enforce-eager", action="store_true", help="skip the warmup (smoke tests)")


def _decode_step_times(engine, params, prompts, steps: int) -> list[float]:
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{time.monotonic_ns()}-{i}", prompt, params)
    times = []
    while engine.has_unfinished_requests() and len(times) < steps:
        decoding = all(len(c.seq.output_token_ids) >= 1 for r in engine._requests.values() for c in r.completions)
        t0 = time.perf_counter()
        engine.step()
        if decoding:
            times.append(time.perf_counter() - t0)
    engine.abort_request(list(engine._requests))
    while engine.has_unfinished_requests():
        engine.step()
    return times


def run(args) -> dict:
    import numpy as np

    from jaxpaged import LLMEngine, SamplingParams, StructuredOutputsParams
    from jaxpaged.structured_output.state import fill_bitmasks, mask_width

    B = args.batch_size
    engine = LLMEngine(model=args.model, dtype=args.dtype, max_num_seqs=B, max_model_len=1024,
                       max_num_batched_tokens=max(512, B), progress=False, download_dir=args.download_dir,
                       enforce_eager=args.enforce_eager)
    prompts = [f"Write a list of {i + 3} things you like, as JSON." for i in range(B)]
    plain = SamplingParams(temperature=0.8, seed=0, max_tokens=args.steps + 8, ignore_eos=True)
    constrained = SamplingParams(temperature=0.8, seed=0, max_tokens=args.steps + 8, ignore_eos=True,
                                 structured_outputs=StructuredOutputsParams(json=SCHEMA))
    _decode_step_times(engine, constrained, prompts[:4], 4)         # compiles the masked sampler variant
    base = _decode_step_times(engine, plain, prompts, args.steps)
    masked = _decode_step_times(engine, constrained, prompts, args.steps)
    states = [engine.structured_output.new_state(constrained.structured_outputs) for _ in range(B)]
    while not all(s.is_ready() for s in states):
        time.sleep(0.01)
    mask = np.full((B, mask_width(engine.model_config.vocab_size)), -1, np.int32)
    build = []
    for _ in range(20):
        t0 = time.perf_counter()
        fill_bitmasks([(s, b) for b, s in enumerate(states)], mask)
        build.append(time.perf_counter() - t0)
    out = dict(batch_size=B, unconstrained_ms=1e3 * statistics.median(base),
               constrained_ms=1e3 * statistics.median(masked), mask_build_ms=1e3 * statistics.median(build))
    out["ratio"] = out["constrained_ms"] / out["unconstrained_ms"]
    print(f"B={B} decode step: unconstrained {out['unconstrained_ms']:.2f} ms, every row constrained "
          f"{out['constrained_ms']:.2f} ms -> {out['ratio']:.3f}x (bar <= 1.15); host mask build "
          f"{out['mask_build_ms']:.2f} ms")
    return out
