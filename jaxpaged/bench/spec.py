"""`bench spec`: speculative decoding against none, the same requests at each batch size.

    python -m jaxpaged.bench spec --workload copy --batch-sizes 1,4,16,64
    python -m jaxpaged.bench spec --workload random --batch-sizes 1,4,16,64 --ignore-eos

Two engines of the same model (one with `--speculative-config`, default n-gram k = 4, lookup 4..2),
both warmed up before anything is timed (start-up reported apart). For each batch size B:
`--num-prompts` requests (default B x `--rounds`) run B at a time (a group of B goes in together and
finishes before the next), so B sequences decode at once; greedy. Prints output tok/s of each, the speedup, the acceptance rate, the mean tokens per
verification, and whether the outputs are identical (they must be: greedy).

Workloads: `copy` (outputs that repeat the prompt: chat prompts asking the model to repeat or lightly
edit a passage of jaxpaged/bench/data/english.txt; the case speculation is for) and `random` (the
issue-6 workload: random token prompts, `--input-len-range` / `--output-len-range`, nothing to copy;
speculation must cost little there).
"""
from __future__ import annotations

import json
import os
import time

from jaxpaged.bench import workload

DEFAULT_SPEC = '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}'
TEXT = os.path.join(os.path.dirname(__file__), "data", "english.txt")
_ASKS = ("Repeat the following text exactly, word for word:\n\n{}",
         "Copy this passage, replacing every full stop with an exclamation mark:\n\n{}",
         "Rewrite the text below unchanged except for fixing any typos:\n\n{}")


def add_args(p) -> None:
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--workload", default="copy", choices=("copy", "random"))
    p.add_argument("--batch-sizes", default="1,4,16,64", help="comma-separated B")
    p.add_argument("--num-prompts", type=int, default=None,
                   help="requests per batch size, run B at a time (default: B x --rounds)")
    p.add_argument("--rounds", type=int, default=1, help="groups of B requests per batch size (default: 1)")
    p.add_argument("--speculative-config", default=DEFAULT_SPEC, help="JSON, vLLM's speculative_config")
    p.add_argument("--max-tokens", type=int, default=256, help="copy workload: max_tokens of each request")
    p.add_argument("--input-len-range", default="32:512", help="random workload: prompt tokens N or LO:HI")
    p.add_argument("--output-len-range", default="16:256", help="random workload: max_tokens N or LO:HI")
    p.add_argument("--ignore-eos", action="store_true", help="every request generates exactly max_tokens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--enforce-eager", action="store_true", help="no warmup (compiles inside the runs)")
    p.add_argument("--download-dir", default=None, help="converted-params cache")
    p.add_argument("--output-json", default=None, help="append one JSON line per batch size here")


def copy_prompts(n: int, tokenizer, seed: int = 0) -> list[list[int]]:
    """n chat prompts asking to repeat / lightly edit a passage (~400-900 characters) of the bench text."""
    import numpy as np

    from jaxpaged.inputs import render_chat
    text = open(TEXT).read()
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        start = int(rng.integers(0, max(1, len(text) - 900)))
        start = text.rfind(" ", 0, start) + 1                      # whole words
        passage = text[start: start + int(rng.integers(400, 900))].rsplit(" ", 1)[0]
        msg = [{"role": "user", "content": _ASKS[i % len(_ASKS)].format(passage)}]
        out.append([int(t) for t in tokenizer.encode(render_chat(tokenizer, msg), add_special_tokens=False)])
    return out


def _requests(args, tokenizer, vocab_size: int, n: int) -> list[tuple[list[int], int]]:
    if args.workload == "copy":
        return [(p, args.max_tokens) for p in copy_prompts(n, tokenizer, args.seed)]
    reqs = workload.random_requests(n, workload.parse_range(args.input_len_range),
                                    workload.parse_range(args.output_len_range), vocab_size, args.seed)
    return [(r.prompt_token_ids, r.max_tokens) for r in reqs]


def _engine(args, max_num_seqs: int, spec):
    from jaxpaged import LLM
    t0 = time.perf_counter()
    llm = LLM(args.model, dtype=args.dtype, max_num_seqs=max_num_seqs, max_model_len=args.max_model_len,
              max_num_batched_tokens=args.max_num_batched_tokens, enforce_eager=True, seed=args.seed,
              download_dir=args.download_dir, speculative_config=spec)
    if not args.enforce_eager:
        llm.llm_engine.runner.warmup(progress=False)
    return llm, time.perf_counter() - t0


def _timed(llm, reqs, ignore_eos: bool, batch: int):
    from jaxpaged import SamplingParams
    stats0 = llm.llm_engine.get_stats()
    outs = []
    t0 = time.perf_counter()
    for i in range(0, len(reqs), batch):          # B at a time
        group = reqs[i: i + batch]
        params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=ignore_eos) for _, m in group]
        outs += llm.generate([{"prompt_token_ids": p} for p, _ in group], params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    stats1 = llm.llm_engine.get_stats()
    drafts = stats1.spec_decode_num_drafts - stats0.spec_decode_num_drafts
    proposed = stats1.spec_decode_num_draft_tokens - stats0.spec_decode_num_draft_tokens
    accepted = stats1.spec_decode_num_accepted_tokens - stats0.spec_decode_num_accepted_tokens
    tokens = [o.outputs[0].token_ids for o in outs]
    return dict(elapsed_s=elapsed, output_tokens=sum(len(t) for t in tokens), tokens=tokens,
                acceptance_rate=accepted / proposed if proposed else None,
                mean_acceptance_length=1 + accepted / drafts if drafts else None, num_drafts=drafts)


def run(args) -> list[dict]:
    sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    if not sizes or min(sizes) < 1:
        raise SystemExit(f"--batch-sizes: expected positive integers, got {args.batch_sizes!r}")
    spec = json.loads(args.speculative_config)
    base, base_s = _engine(args, max(sizes), None)
    fast, fast_s = _engine(args, max(sizes), spec)
    tok = base.get_tokenizer()
    vocab = base.llm_engine.model_config.vocab_size
    print(f"model {args.model} dtype {args.dtype}; workload {args.workload}; speculative_config {spec}; "
          f"start-up (load + warmup): {base_s:.1f} s without, {fast_s:.1f} s with; "
          f"load average {os.getloadavg()[0]:.2f}")
    rows = []
    for b in sizes:
        reqs = _requests(args, tok, vocab, args.num_prompts or b * args.rounds)
        a = _timed(base, reqs, args.ignore_eos, b)
        s = _timed(fast, reqs, args.ignore_eos, b)
        ta, ts = a["output_tokens"] / a["elapsed_s"], s["output_tokens"] / s["elapsed_s"]
        row = dict(batch_size=b, workload=args.workload, num_requests=len(reqs), tok_s_base=ta, tok_s_spec=ts,
                   speedup=ts / ta, acceptance_rate=s["acceptance_rate"],
                   mean_acceptance_length=s["mean_acceptance_length"], num_drafts=s["num_drafts"],
                   identical=a["tokens"] == s["tokens"], output_tokens=a["output_tokens"])
        rows.append(row)
        rate = "-" if row["acceptance_rate"] is None else f"{row['acceptance_rate']:.2f}"
        mean = "-" if row["mean_acceptance_length"] is None else f"{row['mean_acceptance_length']:.2f}"
        print(f"B={b:<3} {ta:8.1f} tok/s without, {ts:8.1f} with: {row['speedup']:.2f}x; acceptance {rate}, "
              f"tokens per verification {mean}, {s['num_drafts']} verifications; "
              f"{a['output_tokens']} output tokens; identical outputs: {row['identical']}")
        if args.output_json:
            with open(args.output_json, "a") as f:
                f.write(json.dumps(row) + "\n")
    return rows
