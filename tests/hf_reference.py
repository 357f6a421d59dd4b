"""Reference outputs from Hugging Face transformers (torch, CPU, f32), one prompt at a time. Tests only."""
from __future__ import annotations

import functools

import numpy as np
import torch

from tests import tiny_models


@functools.lru_cache(maxsize=None)
def hf_model(kind: str):
    return tiny_models.make_hf_model(kind)


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation of exactly max_new_tokens tokens (eos does not stop it)."""
    ids = torch.tensor([prompt_ids], dtype=torch.long)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                             pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt_ids):].tolist()


def hf_logprobs(model, token_ids: list[int]) -> np.ndarray:
    """log_softmax of the logits at every position of token_ids: [len, V]."""
    with torch.no_grad():
        logits = model(torch.tensor([token_ids], dtype=torch.long)).logits[0]
    return torch.log_softmax(logits.double(), -1).numpy()
