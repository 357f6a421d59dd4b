"""KV-cache memory figure: how full the paged blocks are, and what n > 1 sharing saves.

    python -m jaxpaged.kv_memory_report [--num-requests 200] [--seed 0] [--max-model-len 2048]

Pure Python, no model, no jax: requests with random (seeded) prompt and output lengths run
through the real Scheduler and BlockManager, with a stand-in for the model that samples a
random token for every request that is ready to sample.

1. Slot utilization: after every step, the tokens whose K/V are held (sum of
   num_computed_tokens over running requests) over the slots of the blocks in use
   (used_blocks * block_size), summed over all steps; against reserving max_model_len slots
   per running request (the contiguous-cache baseline), over the same steps.
2. Sharing: 4 samples of one prompt as an n=4 group (prefill once, fork, copy-on-write)
   against 4 separate requests (prefix caching off, so nothing is shared): peak blocks in use.
"""
from __future__ import annotations

import argparse
import random

from jaxpaged.sequence import Sequence, SequenceStatus
from jaxpaged.scheduler import Scheduler


def _drive(sched: Scheduler, out_len: dict[str, int], rng: random.Random, on_step=None) -> int:
    """Runs the scheduler to completion with random tokens; returns the number of steps."""
    steps = 0
    while sched.has_unfinished_sequences():
        out = sched.schedule()
        sched.update_from_output(out)
        for sr in out.scheduled:
            if sr.sample:
                r = sr.seq
                sched.append_token(r.seq_id, rng.randrange(32000))
                if r.num_output_tokens >= out_len[r.seq_id]:
                    sched.finish_sequence(r.seq_id, SequenceStatus.FINISHED_LENGTH)
        if on_step is not None:
            on_step(sched)
        steps += 1
        if steps > 10_000_000:
            raise RuntimeError("no progress")
    return steps


def utilization(num_requests: int = 200, block_size: int = 16, max_model_len: int = 2048,
                seed: int = 0, pool_tokens: int = 65536) -> dict:
    """Fraction of allocated KV slots that hold tokens, paged vs max_model_len reservation."""
    rng = random.Random(seed)
    sched = Scheduler(num_blocks=pool_tokens // block_size + 1, block_size=block_size, max_num_seqs=64,
                      max_num_batched_tokens=2048, max_model_len=max_model_len,
                      enable_prefix_caching=False)
    out_len = {}
    final_tokens = final_slots = 0
    for k in range(num_requests):
        p = rng.randint(16, 1024)
        o = rng.randint(1, min(1024, max_model_len - p))
        rid = f"r{k}"
        out_len[rid] = o
        sched.add_sequence(Sequence(rid, [rng.randrange(32000) for _ in range(p)], arrival_time=k))
        final_tokens += p + o
        final_slots += -(-(p + o) // block_size) * block_size
    acc = {"tokens": 0, "slots": 0, "reserved": 0, "peak_running": 0}

    def on_step(s: Scheduler) -> None:
        acc["tokens"] += sum(r.num_computed_tokens for r in s.running)
        acc["slots"] += s.block_manager.num_used_blocks * block_size
        acc["reserved"] += len(s.running) * max_model_len
        acc["peak_running"] = max(acc["peak_running"], len(s.running))

    steps = _drive(sched, out_len, rng, on_step)
    assert sched.block_manager.num_used_blocks == 0
    return {
        "block_size": block_size,
        "steps": steps,
        "paged": acc["tokens"] / acc["slots"],
        "reserved": acc["tokens"] / acc["reserved"],
        "final_paged": final_tokens / final_slots,
        "final_reserved": final_tokens / (num_requests * max_model_len),
        "preemptions": sched.num_preemptions,
        "peak_running": acc["peak_running"],
    }


def sharing(prompt_len: int = 512, output_len: int = 128, n: int = 4, block_size: int = 16,
            seed: int = 0) -> dict:
    """Peak blocks in use for n samples of one prompt: one n-group vs n separate requests."""
    rng = random.Random(seed)
    prompt = [rng.randrange(32000) for _ in range(prompt_len)]

    def run(grouped: bool) -> tuple[int, int]:
        sched = Scheduler(num_blocks=4096, block_size=block_size, max_num_seqs=16,
                          max_num_batched_tokens=4096, max_model_len=4096,
                          enable_prefix_caching=False)
        reqs = [Sequence(f"s{k}", list(prompt), arrival_time=0.0) for k in range(n)]
        if grouped:
            sched.add_sequence_group(reqs)
        else:
            for r in reqs:
                sched.add_sequence(r)
        peak = [0, 0]

        def on_step(s: Scheduler) -> None:
            peak[0] = max(peak[0], s.block_manager.num_used_blocks)
            if all(r.num_output_tokens >= 1 for r in reqs):   # just after the prompt
                peak[1] = peak[1] or s.block_manager.num_used_blocks

        _drive(sched, {r.seq_id: output_len for r in reqs}, random.Random(seed + 1), on_step)
        assert sched.block_manager.num_used_blocks == 0
        return peak[0], peak[1]

    (g_peak, g_prompt), (s_peak, s_prompt) = run(True), run(False)
    return {"prompt_len": prompt_len, "output_len": output_len, "n": n, "block_size": block_size,
            "group_after_prompt": g_prompt, "separate_after_prompt": s_prompt,
            "group_peak": g_peak, "separate_peak": s_peak, "saved_peak": s_peak - g_peak}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-requests", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-model-len", type=int, default=2048)
    args = ap.parse_args(argv)

    print(f"## Slot utilization: {args.num_requests} requests, prompt U[16, 1024], output "
          f"U[1, min(1024, max_model_len - prompt)], max_model_len {args.max_model_len}, seed {args.seed}")
    print("(KV pool 65536 tokens, max_num_seqs 64, budget 2048 tokens/step; time-averaged over every "
          "step: held tokens / allocated slots; 'final' = each request at its full length)\n")
    print("| block_size | paged | reserve max_model_len | paged, final | reserve, final | steps | preemptions |")
    print("|---|---|---|---|---|---|---|")
    for bs in (8, 16, 32):
        u = utilization(args.num_requests, bs, args.max_model_len, args.seed)
        print(f"| {bs} | {u['paged']:.2%} | {u['reserved']:.2%} | {u['final_paged']:.2%} | "
              f"{u['final_reserved']:.2%} | {u['steps']} | {u['preemptions']} |")

    print("\n## Sharing: 4 samples of one prompt (n=4 group: prefill once, fork, copy-on-write) "
          "vs 4 separate requests")
    print("(blocks in use just after the prompt, and at the peak)\n")
    print("| block_size | prompt | output | group, after prompt | separate, after prompt | "
          "group, peak | separate, peak | saved at peak |")
    print("|---|---|---|---|---|---|---|---|")
    for bs in (16,):
        for prompt_len, output_len in ((512, 128), (1000, 64), (100, 256)):
            r = sharing(prompt_len, output_len, 4, bs, args.seed)
            print(f"| {bs} | {prompt_len} | {output_len} | {r['group_after_prompt']} | "
                  f"{r['separate_after_prompt']} | {r['group_peak']} | {r['separate_peak']} | "
                  f"{r['saved_peak']} ({r['saved_peak'] / r['separate_peak']:.0%}) |")


if __name__ == "__main__":
    main()
