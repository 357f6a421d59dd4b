"""Random PEFT LoRA adapters for the tiny test models, and their transformers + peft greedy outputs.

Tests only (torch, peft): the engine reads the saved folders with numpy.
"""
from __future__ import annotations

import functools


def make_adapter(model_path: str, out_dir: str, *, r: int, alpha: float, targets, seed: int, **extra) -> str:
    """Saves a PEFT LoRA adapter for the model in `model_path` with random, non-zero A and B."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_path, torch_dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0,
                                            init_lora_weights=False, **extra))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:      # big enough to change greedy choices, small enough to stay sane
                p.copy_(torch.randn(p.shape, generator=gen) * 0.15)
    model.save_pretrained(out_dir)
    return out_dir


@functools.lru_cache(maxsize=None)
def _peft_model(model_path: str, adapter_path: str | None):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_path, torch_dtype=torch.float32).eval()
    return base if adapter_path is None else PeftModel.from_pretrained(base, adapter_path).eval()


def peft_greedy(model_path: str, adapter_path: str | None, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers + peft (unmerged adapter) greedy continuation of exactly max_new_tokens tokens."""
    import torch

    model = _peft_model(model_path, adapter_path)
    ids = torch.tensor([prompt_ids], dtype=torch.long)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                             pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt_ids):].tolist()
