"""The transformers backend of `bench throughput`: batched `generate`, left padding, greedy.

Requests are sorted by max_tokens (longest first) and cut into batches of `batch_size`; a batch
generates up to its largest max_tokens and each request keeps (and counts) only its own max_tokens
(up to its first eos unless ignore_eos). Sorting keeps the tokens generated past a request's budget
small. The model is transformers' LlamaForCausalLM (or AutoModelForCausalLM for an HF directory);
a GGUF source (the built-in model) is read by transformers' own GGUF reader and can be saved as an
HF directory (`export_hf_dir`), which is what the vLLM backend loads. torch is imported lazily: it
is only needed here.
"""
from __future__ import annotations

import os
import time

from jaxpaged.bench.workload import BenchRequest


def _torch_dtype(dtype: str):
    import torch
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]


def load_hf_model(model: str, dtype: str = "float32"):
    """(model, source) for a jaxpaged model argument (built-in name, .gguf file or HF directory)."""
    import torch
    from transformers import AutoModelForCausalLM

    from jaxpaged.convert.resolve import resolve_model

    source = resolve_model(model)
    if source.kind == "hf_dir":
        m = AutoModelForCausalLM.from_pretrained(source.path, dtype=_torch_dtype(dtype), local_files_only=True)
        return m.eval(), source
    return _model_from_gguf(source.path).to(_torch_dtype(dtype)).eval(), source


def _model_from_gguf(path: str):
    """transformers' own GGUF reader (independent of jaxpaged's converter) into a Llama model."""
    import torch
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers import LlamaConfig, LlamaForCausalLM

    # the name mapping needs a model of the right depth: read the config first
    layers = gguf_utils.load_gguf_checkpoint(path, return_tensors=False)["config"]["num_hidden_layers"]
    with torch.device("meta"):
        meta = LlamaForCausalLM(LlamaConfig(num_hidden_layers=layers, tie_word_embeddings=True))
    parsed = gguf_utils.load_gguf_checkpoint(path, return_tensors=True, model_to_load=meta)
    cfg = {k: v for k, v in parsed["config"].items() if k != "model_type"}
    tensors = parsed["tensors"]
    tie = "lm_head.weight" not in tensors
    model = LlamaForCausalLM(LlamaConfig(**{**cfg, "tie_word_embeddings": tie}))
    missing, _ = model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=False)
    if set(missing) - {"lm_head.weight"}:
        raise ValueError(f"{path}: transformers' GGUF reader left parameters unfilled: {sorted(missing)[:5]}")
    if tie:
        model.tie_weights()
    return model


def export_hf_dir(model: str, out_dir: str | None = None) -> str:
    """An HF directory (config, float32 safetensors, tokenizer) of `model`; reused when it exists."""
    from jaxpaged.convert.resolve import resolve_model

    source = resolve_model(model)
    if source.kind == "hf_dir":
        return source.path
    if out_dir is None:
        from jaxpaged.convert import cache_root
        base = os.path.splitext(os.path.basename(source.path))[0]
        out_dir = os.path.join(cache_root(None), "bench-hf", base)
    if os.path.isfile(os.path.join(out_dir, "config.json")):
        return out_dir
    from jaxpaged.convert.gguf_io import GGUFFile
    from jaxpaged.convert.gguf_tokenizer import build_tokenizer

    hf = _model_from_gguf(source.path)
    tmp = out_dir + ".tmp"
    hf.save_pretrained(tmp)
    build_tokenizer(GGUFFile(source.path)).save_pretrained(tmp)
    os.replace(tmp, out_dir)
    return out_dir


def run_hf(model: str, requests: list[BenchRequest], *, dtype: str = "float32", batch_size: int = 16,
           ignore_eos: bool = False, eos_token_ids=(), pad_token_id: int = 0, num_threads: int | None = None,
           hf_model=None) -> dict:
    """Runs `requests` through transformers generate; returns timings and token counts."""
    import torch

    if num_threads:
        torch.set_num_threads(num_threads)
    t0 = time.perf_counter()
    if hf_model is None:
        hf_model, _ = load_hf_model(model, dtype)
    load_s = time.perf_counter() - t0
    eos = set(int(e) for e in eos_token_ids)
    order = sorted(range(len(requests)), key=lambda i: -requests[i].max_tokens)
    # one tiny warmup generate (first-call allocations), not timed
    with torch.no_grad():
        ids = torch.tensor([requests[order[0]].prompt_token_ids[:8]])
        hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False,
                          pad_token_id=pad_token_id)
    out_tokens = generated = 0
    t0 = time.perf_counter()
    for start in range(0, len(order), batch_size):
        batch = [requests[i] for i in order[start:start + batch_size]]
        width = max(len(r.prompt_token_ids) for r in batch)
        ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, r in enumerate(batch):                 # left padding
            n = len(r.prompt_token_ids)
            ids[row, width - n:] = torch.tensor(r.prompt_token_ids)
            mask[row, width - n:] = 1
        new = max(r.max_tokens for r in batch)
        kw = dict(min_new_tokens=new, eos_token_id=None) if ignore_eos else {}
        with torch.no_grad():
            gen = hf_model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                                    pad_token_id=pad_token_id, **kw)[:, width:]
        generated += gen.numel()
        for row, r in enumerate(batch):
            toks = gen[row, : r.max_tokens].tolist()
            if not ignore_eos:
                stop = next((j for j, t in enumerate(toks) if t in eos), None)
                toks = toks if stop is None else toks[: stop + 1]
            out_tokens += len(toks)
    elapsed = time.perf_counter() - t0
    return dict(backend="hf", elapsed_s=elapsed, start_s=load_s, output_tokens=out_tokens,
                prompt_tokens=sum(len(r.prompt_token_ids) for r in requests), num_requests=len(requests),
                extra=f"batch_size={batch_size}, generated incl. past-budget {generated}, "
                      f"torch threads {torch.get_num_threads()}")
