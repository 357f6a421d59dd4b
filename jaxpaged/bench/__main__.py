"""python -m jaxpaged.bench {throughput,latency,serve,load,kernel,matmul,startup,gpu-check,random-model,structured,perplexity,memory,lora,spec} [options]; --help on each.

  throughput  offline requests/s and tok/s, side by side with transformers / vLLM (--backend jaxpaged,hf,vllm)
  latency     one batch size: per-step time, host vs device split, FLOP ceiling, device-step breakdown
  serve       against a running server (or jaxpaged and vLLM servers it starts): Poisson arrivals; TTFT, TPOT, ITL, E2E
  load        against a running server: N concurrent streams, some aborted; answered/aborted/errors, KV freed, RSS
  kernel      the attention kernels against their jnp references
  matmul      the native packed weight matmul against XLA's dot on a model's weight shapes; int8 / GGUF kernels too
  startup     cold start (empty caches) vs warm start (converted params and compilations cached)
  gpu-check   on a GPU: the GPU tests, attention bandwidth (% of HBM peak), end-to-end throughput -> one report
  random-model  a random-weight HF Llama checkpoint of a real model's shape (benchmarks without the weights)
  structured  a B=64 decode step with every row under a JSON schema vs none (mask overhead)
  perplexity  perplexity of a fixed English text from prompt log-probs (dense vs int8, ... side by side)
  memory      where an engine's resident memory goes: runtime, params, KV pool, compiled steps
  lora        throughput with 0 / 1 / 4 / 16 distinct LoRA adapters per rank vs the base model; memory per adapter
  spec        speculative decoding vs none at B = 1, 4, 16, 64 (copy-heavy or random workload): speedup, acceptance
"""
from __future__ import annotations

import argparse
import importlib

COMMANDS = ("throughput", "latency", "serve", "load", "kernel", "matmul", "startup", "gpu-check", "random-model", "structured",
            "perplexity", "memory", "lora", "spec")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jaxpaged.bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        mod = importlib.import_module(f"jaxpaged.bench.{name.replace('-', '_')}")
        p = sub.add_parser(name, help=mod.__doc__.splitlines()[0], description=mod.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_args(p)
        p.set_defaults(_module=mod)
    return parser


def main(argv=None) -> None:
    args = make_parser().parse_args(argv)
    args._module.run(args)


if __name__ == "__main__":
    main()
