"""`bench lora`: offline throughput with 0, 1, 4, 16 distinct LoRA adapters in the batch, per rank, vs the base model.

    python -m jaxpaged.bench lora --num-prompts 128 --input-len-range 64:256 --output-len-range 64:128 \
        --ignore-eos --ranks 8,16,64 --adapters 0,1,4,16

The same requests run through the base engine (enable_lora=False), then, per rank R, through one
engine with enable_lora=True, max_lora_rank=R and max_loras = --max-loras (default: the largest
adapter count, as a server configured for that many adapters at once would be; vLLM's own default is
1), once per adapter count N, request i using adapter i mod N (N = 0: LoRA enabled, every row a base
row: the enabled-but-unused cost). The native kernel's cost follows the slots the rows use, not
max_loras, so one engine per rank measures every N (and compiles once: 1 + len(ranks) engines).
The adapters are random PEFT folders written here with numpy (every decoder Linear targeted, rank R).
Each engine compiles its buckets before its first timed run (not timed), and its adapters are
registered before each run (a one-off disk read); loading them into device slots happens inside the run.
Prints output tok/s, its ratio to the base engine, and the memory an adapter takes (device slot
bytes at max_lora_rank, all targets).
"""
from __future__ import annotations

import gc
import json
import os
import tempfile
import time

import numpy as np

from jaxpaged.bench import workload


def add_args(p) -> None:
    workload.add_workload_args(p)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--ranks", default="8,16,64", help="comma-separated LoRA ranks (max_lora_rank = rank)")
    p.add_argument("--adapters", default="0,1,4,16", help="comma-separated distinct adapter counts")
    p.add_argument("--max-loras", type=int, default=None,
                   help="adapter slots of each LoRA engine (default: the largest of --adapters)")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--enforce-eager", action="store_true", help="no warmup (compiles inside the timed run)")
    p.add_argument("--download-dir", default=None, help="converted-params cache")
    p.add_argument("--output-json", default=None, help="append one JSON line per case here")


def write_random_adapter(path: str, cfg, rank: int, seed: int) -> str:
    """A PEFT LoRA folder for the model of `cfg` (every decoder Linear, rank `rank`, alpha 2 * rank)."""
    from safetensors.numpy import save_file

    from jaxpaged.lora.modules import lora_modules

    rng = np.random.default_rng(seed)
    modules = lora_modules(cfg)
    tensors = {}
    for m in modules.values():
        for i in range(cfg.num_layers):
            name = f"base_model.model.{m.hf_name.format(i=i)}"
            tensors[f"{name}.lora_A.weight"] = (rng.standard_normal((rank, m.d_in)) * 0.02).astype(np.float32)
            tensors[f"{name}.lora_B.weight"] = (rng.standard_normal((m.d_out, rank)) * 0.02).astype(np.float32)
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    targets = sorted({m.suffix.rsplit(".", 1)[-1] for m in modules.values()})
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": targets,
                   "bias": "none"}, f)
    return path


def _engine(args, **lora):
    from jaxpaged import LLM
    return LLM(args.model, dtype=args.dtype, max_num_seqs=args.max_num_seqs,
               max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
               enforce_eager=True, seed=args.seed, download_dir=args.download_dir,
               # an engine runs the same prompts once per adapter count: no prefix hits across runs
               enable_prefix_caching=False, **lora)


def _warmup(args, llm) -> None:
    """Compiles the engine's step buckets (not timed; --enforce-eager: none, they compile in the runs)."""
    if not args.enforce_eager:
        llm.llm_engine.runner.warmup(progress=False)


def run_case(args, requests, llm, loras: list | None) -> dict:
    from jaxpaged import SamplingParams

    engine = llm.llm_engine
    for req in {id(r): r for r in loras or [] if r is not None}.values():
        engine.add_lora(req)
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in requests]
    params = [SamplingParams(max_tokens=r.max_tokens, ignore_eos=args.ignore_eos, temperature=0.0) for r in requests]
    lora = engine.runner.lora
    loads = lora.lru.num_loads if lora is not None else 0     # cumulative over the engine's runs
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False, lora_request=loras)
    elapsed = time.perf_counter() - t0
    return dict(elapsed_s=elapsed, output_tokens=sum(len(o.outputs[0].token_ids) for o in outs),
                slot_bytes=lora.nbytes_per_slot if lora is not None else 0,
                slot_loads=lora.lru.num_loads - loads if lora is not None else 0)


def run(args) -> None:
    from jaxpaged import LoRARequest

    ranks = [int(x) for x in str(args.ranks).split(",")]
    counts = [int(x) for x in str(args.adapters).split(",")]
    llm = _engine(args)
    _warmup(args, llm)
    cfg = llm.llm_engine.model_config
    requests = workload.build_requests(args, llm.get_tokenizer(), cfg.vocab_size)
    print(workload.summary(requests))
    rows = [dict(case="base", rank=0, adapters=0, **run_case(args, requests, llm, None))]
    del llm
    gc.collect()
    _report(rows[0], rows[0], args.output_json)
    max_loras = args.max_loras or max(max(counts), 1)
    if max(counts) > max_loras:
        raise ValueError(f"--max-loras: {max_loras} slots cannot hold {max(counts)} distinct adapters in one batch")
    with tempfile.TemporaryDirectory(prefix="jaxpaged-bench-lora-") as tmp:
        for rank in ranks:
            paths = [write_random_adapter(os.path.join(tmp, f"r{rank}-{i}"), cfg, rank, seed=rank * 1000 + i)
                     for i in range(max(counts))]
            reqs = [LoRARequest(f"r{rank}-{i}", i + 1, paths[i]) for i in range(max(counts))]
            llm = _engine(args, enable_lora=True, max_loras=max_loras, max_lora_rank=rank)
            _warmup(args, llm)
            for n in counts:
                loras = [reqs[i % n] for i in range(len(requests))] if n else None
                row = dict(case="lora", rank=rank, adapters=n, max_loras=max_loras,
                           **run_case(args, requests, llm, loras))
                _report(row, rows[0], args.output_json)
                rows.append(row)
            del llm
            gc.collect()


def _report(row: dict, base: dict, output_json: str | None) -> None:
    tps = row["output_tokens"] / row["elapsed_s"]
    base_tps = base["output_tokens"] / base["elapsed_s"]
    name = ("base model (LoRA off)" if row["case"] == "base" else
            f"rank {row['rank']:>3}, {row['adapters']:>2} adapters ({row['max_loras']} slots)")
    print(f"{name:<36} {tps:9.1f} output tok/s  {tps / base_tps:5.2f}x base  "
          f"adapter slot {row['slot_bytes'] / 2**20:7.2f} MiB  ({row['slot_loads']} slot loads, "
          f"{row['output_tokens']} tokens in {row['elapsed_s']:.1f} s)", flush=True)
    if output_json:
        with open(output_json, "a") as f:
            f.write(json.dumps({**row, "output_tok_s": tps, "vs_base": tps / base_tps}) + "\n")
