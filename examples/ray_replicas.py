"""Offline batch inference on Ray: one `jaxpaged.LLM` per Ray actor, the prompts split over the actors.

    pip install "jaxpaged[ray]"
    python examples/ray_replicas.py                       # 2 replicas on a local Ray (127.0.0.1)
    RAY_ADDRESS=head:6379 python examples/ray_replicas.py --num-replicas 8   # an existing cluster

Each actor reserves `--num-cpus` CPUs (and `--num-gpus` GPUs, which Ray makes the only ones its
process sees); the engine inside is an ordinary LLM. `--all-replicas` also sends every prompt to
every replica (greedy outputs are identical across replicas); `--json` prints token ids.
"""
from __future__ import annotations

import argparse
import json
import os

import ray

from jaxpaged import SamplingParams

PROMPTS = ["The capital of France is", "The quick brown fox", "Paged attention stores", "Hello world! How are"]


@ray.remote
class DistributedLLM:
    """An LLM in its own Ray worker process; `generate` returns plain data (text and token ids)."""

    def __init__(self, **llm_kwargs):
        from jaxpaged import LLM
        self.llm = LLM(**llm_kwargs)

    def generate(self, prompts: list[str], params: SamplingParams) -> list[dict]:
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        return [dict(prompt=o.prompt, text=o.outputs[0].text, token_ids=list(o.outputs[0].token_ids))
                for o in outs]


def generate_sharded(replicas, prompts: list[str], params: SamplingParams) -> list[dict]:
    """Prompt i goes to replica i % len(replicas); results come back in prompt order."""
    shards = [prompts[r::len(replicas)] for r in range(len(replicas))]
    results = ray.get([rep.generate.remote(shard, params) for rep, shard in zip(replicas, shards) if shard])
    out = [None] * len(prompts)
    for r, result in enumerate(results):
        out[r::len(replicas)] = result
    return out


def start_ray() -> None:
    """Joins $RAY_ADDRESS, else starts a private Ray on 127.0.0.1 (the server's helper does the same)."""
    from jaxpaged.server.ray_utils import init_ray
    init_ray(os.environ.get("RAY_ADDRESS"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--num-replicas", type=int, default=2)
    p.add_argument("--num-cpus", type=float, default=1)
    p.add_argument("--num-gpus", type=float, default=0)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--download-dir", default=None, help="converted-params and compilation cache")
    p.add_argument("--all-replicas", action="store_true", help="every replica generates every prompt")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    args = p.parse_args()

    start_ray()
    try:
        replicas = [DistributedLLM.options(num_cpus=args.num_cpus, num_gpus=args.num_gpus).remote(
            model=args.model, max_model_len=args.max_model_len, max_num_seqs=8, enforce_eager=True,
            download_dir=args.download_dir)
            for _ in range(args.num_replicas)]
        params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
        results = {"sharded": generate_sharded(replicas, PROMPTS, params)}
        if args.all_replicas:
            results["per_replica"] = ray.get([r.generate.remote(PROMPTS, params) for r in replicas])
        if args.json:
            print(json.dumps(results))
        else:
            for row in results["sharded"]:
                print(f"{row['prompt']!r} -> {row['text']!r}")
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
