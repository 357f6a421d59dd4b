"""Subprocess worker of the tensor-parallel and multi-process tests (not collected by pytest).

XLA's host device count and jax.distributed must be set up before JAX initialises its backend, and the
pytest process has long since done that, so each case runs here:

    python -m tests.tp_worker SPEC_JSON OUT_JSON

SPEC: devices (CPU devices of this process), model, tps (list of tensor_parallel_size to run in turn),
prompts (token-id lists), max_tokens, attention_backend (a name, or one per tp), download_dir, params (param paths whose per-device
shard shapes to report; a path may go on into a weight type's fields, e.g. layers/q_proj/kernel/q), and
optionally quantization, kv_cache_dtype, distributed = {port, num_processes, process_id} and LoRA: loras
(a list of [name, id, path]) with lora_of_prompt (per prompt an index into loras, or null), max_lora_rank.
OUT: {"tokens": {tp: [[ids] per prompt]}, "shards": {tp: {path: [[shape] per local device]}},
      "kv_shards": {tp: [[shape] per local device]} (K pages; "kv_scale_shards" the same for an 8-bit
      cache's K scales), "num_kv_heads": {tp: n}, "global_devices": n,
      "lora_shards": {tp: {module path: [[a shard shapes], [b shard shapes]]}} (LoRA only)}.
"""
from __future__ import annotations

import json
import os
import sys


def main(spec_path: str, out_path: str) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={spec['devices']}"
    import jax
    dist = spec.get("distributed")
    if dist:
        jax.distributed.initialize(coordinator_address=f"127.0.0.1:{dist['port']}",
                                   num_processes=dist["num_processes"], process_id=dist["process_id"])
    from flax import nnx

    from jaxpaged import LLM, LoRARequest, SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], ignore_eos=True)
    out = {"tokens": {}, "shards": {}, "kv_shards": {}, "num_kv_heads": {}, "global_devices": jax.device_count()}
    backend = spec["attention_backend"]
    loras = [LoRARequest(*x) for x in spec.get("loras", [])]
    lora_kw = dict(enable_lora=True, max_loras=len(loras), max_lora_rank=spec.get("max_lora_rank", 16)) if loras else {}
    lora_of = [loras[i] if i is not None else None for i in spec["lora_of_prompt"]] if loras else None
    for i, tp in enumerate(spec["tps"]):
        llm = LLM(spec["model"], tensor_parallel_size=tp, max_model_len=128, max_num_seqs=4,
                  max_num_batched_tokens=64, enforce_eager=True,
                  attention_backend=backend[i] if isinstance(backend, list) else backend,
                  download_dir=spec["download_dir"], quantization=spec.get("quantization"),
                  kv_cache_dtype=spec.get("kv_cache_dtype", "auto"), **lora_kw)
        outs = llm.generate(spec["prompts"], params, use_tqdm=False, lora_request=lora_of)
        engine = llm.llm_engine
        pure = nnx.to_pure_dict(engine.runner.state)
        shards = {}
        for path in spec.get("params", []):
            arr = pure
            for key in path.split("/"):
                arr = arr[key] if isinstance(arr, dict) else getattr(arr, key)   # into a Weight's fields
            shards[path] = [list(s.data.shape) for s in arr.addressable_shards]
        key = str(tp)
        out["tokens"][key] = [o.outputs[0].token_ids for o in outs]
        out["shards"][key] = shards
        k_leaves = jax.tree_util.tree_leaves(engine.runner.kv_cache[0])   # pages (+ an 8-bit cache's scales)
        out["kv_shards"][key] = [list(s.data.shape) for s in k_leaves[0].addressable_shards]
        if len(k_leaves) > 1:
            out.setdefault("kv_scale_shards", {})[key] = [list(s.data.shape) for s in k_leaves[1].addressable_shards]
        out["num_kv_heads"][key] = engine.model_config.num_kv_heads
        if engine.runner.lora is not None:     # per LoRA target: [a shard shapes, b shard shapes]
            out.setdefault("lora_shards", {})[key] = {
                p: [[list(s.data.shape) for s in x.addressable_shards] for x in ab]
                for p, ab in engine.runner.lora.stacks.items()}
        del llm, engine
    with open(out_path, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
