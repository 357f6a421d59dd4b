"""Benchmark requests from a seed: random token prompts with random or fixed lengths, or a JSONL file.

Every backend gets the same `BenchRequest` list (prompt token ids + max_tokens), so outputs per second
compare like for like. Random prompts draw token ids uniformly from [first_id, vocab) with
`numpy.random.default_rng(seed)`; lengths are uniform in an inclusive "lo:hi" range (or fixed "n").
A JSONL file holds one object per line: {"prompt": str} or {"prompt_token_ids": [int]}, optionally
"max_tokens": int (else the output length is drawn as for random prompts).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BenchRequest:
    prompt_token_ids: list[int]
    max_tokens: int


def parse_range(text: str | int) -> tuple[int, int]:
    """'32:512' -> (32, 512) inclusive; '128' -> (128, 128)."""
    if isinstance(text, int):
        return text, text
    parts = str(text).split(":")
    try:
        lo, hi = (int(parts[0]), int(parts[0])) if len(parts) == 1 else (int(parts[0]), int(parts[1]))
    except ValueError:
        raise ValueError(f"length range {text!r}: expected N or LO:HI") from None
    if len(parts) > 2 or lo < 1 or hi < lo:
        raise ValueError(f"length range {text!r}: expected N or LO:HI with 1 <= LO <= HI")
    return lo, hi


def random_requests(num: int, input_len: tuple[int, int], output_len: tuple[int, int], vocab_size: int,
                    seed: int = 0, first_id: int = 100) -> list[BenchRequest]:
    """`num` requests of random token ids; ids below `first_id` (special tokens) are never drawn."""
    rng = np.random.default_rng(seed)
    in_lens = rng.integers(input_len[0], input_len[1] + 1, num)
    out_lens = rng.integers(output_len[0], output_len[1] + 1, num)
    return [BenchRequest(rng.integers(first_id, vocab_size, int(n)).tolist(), int(m))
            for n, m in zip(in_lens, out_lens)]


def jsonl_requests(path: str, tokenizer, output_len: tuple[int, int], seed: int = 0,
                   num: int | None = None) -> list[BenchRequest]:
    """Requests from a JSONL file of prompts (see the module docstring); the first `num` lines."""
    rng = np.random.default_rng(seed)
    out = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            obj = json.loads(line)
            if "prompt_token_ids" in obj:
                ids = [int(t) for t in obj["prompt_token_ids"]]
            elif "prompt" in obj:
                ids = list(tokenizer.encode(obj["prompt"]))
            else:
                raise ValueError(f"{path}:{lineno}: expected 'prompt' or 'prompt_token_ids'")
            max_tokens = int(obj.get("max_tokens") or rng.integers(output_len[0], output_len[1] + 1))
            out.append(BenchRequest(ids, max_tokens))
            if num is not None and len(out) == num:
                break
    if not out:
        raise ValueError(f"{path}: no prompts")
    return out


def add_workload_args(p) -> None:
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--input-len-range", default="32:512", help="prompt tokens: N or LO:HI (uniform, inclusive)")
    p.add_argument("--output-len-range", default="16:256", help="max_tokens: N or LO:HI (uniform, inclusive)")
    p.add_argument("--dataset", default=None, help="JSONL file of prompts instead of random token ids")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ignore-eos", action="store_true", help="every request generates exactly max_tokens")


def build_requests(args, tokenizer, vocab_size: int) -> list[BenchRequest]:
    out_range = parse_range(args.output_len_range)
    if args.dataset:
        return jsonl_requests(args.dataset, tokenizer, out_range, args.seed, args.num_prompts)
    return random_requests(args.num_prompts, parse_range(args.input_len_range), out_range, vocab_size,
                           args.seed)


def summary(requests: list[BenchRequest]) -> str:
    ins = [len(r.prompt_token_ids) for r in requests]
    outs = [r.max_tokens for r in requests]
    return (f"{len(requests)} requests, prompt tokens {sum(ins)} (mean {np.mean(ins):.0f}, {min(ins)}..{max(ins)}), "
            f"max output tokens {sum(outs)} (mean {np.mean(outs):.0f}, {min(outs)}..{max(outs)})")
