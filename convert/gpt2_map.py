"""GPT-2: HF tensor name -> param path, one table (same columns as llama_map.TABLE).

HF GPT-2 uses Conv1D, whose weights are already [in, out], so nothing is transposed. Names are
matched without the "transformer." prefix: GPT2LMHeadModel checkpoints carry it, the original
OpenAI-converted ones (and GPT2Model) do not.
"""
from __future__ import annotations

import re

TABLE = (
    ("wte.weight", "wte/embedding", None, lambda c: (c.vocab_size, c.hidden_size), None),
    ("wpe.weight", "wpe/embedding", None, lambda c: (c.max_position_embeddings, c.hidden_size), None),
    ("h.{i}.ln_1.weight", "layers/ln_1/scale", None, lambda c: (c.hidden_size,), None),
    ("h.{i}.ln_1.bias", "layers/ln_1/bias", None, lambda c: (c.hidden_size,), None),
    ("h.{i}.attn.c_attn.weight", "layers/qkv/kernel", None, lambda c: (c.hidden_size, 3 * c.hidden_size), None),
    ("h.{i}.attn.c_attn.bias", "layers/qkv/bias", None, lambda c: (3 * c.hidden_size,), None),
    ("h.{i}.attn.c_proj.weight", "layers/attn_out/kernel", None, lambda c: (c.hidden_size, c.hidden_size), None),
    ("h.{i}.attn.c_proj.bias", "layers/attn_out/bias", None, lambda c: (c.hidden_size,), None),
    ("h.{i}.ln_2.weight", "layers/ln_2/scale", None, lambda c: (c.hidden_size,), None),
    ("h.{i}.ln_2.bias", "layers/ln_2/bias", None, lambda c: (c.hidden_size,), None),
    ("h.{i}.mlp.c_fc.weight", "layers/fc/kernel", None, lambda c: (c.hidden_size, c.intermediate_size), None),
    ("h.{i}.mlp.c_fc.bias", "layers/fc/bias", None, lambda c: (c.intermediate_size,), None),
    ("h.{i}.mlp.c_proj.weight", "layers/proj/kernel", None, lambda c: (c.intermediate_size, c.hidden_size), None),
    ("h.{i}.mlp.c_proj.bias", "layers/proj/bias", None, lambda c: (c.hidden_size,), None),
    ("ln_f.weight", "ln_f/scale", None, lambda c: (c.hidden_size,), None),
    ("ln_f.bias", "ln_f/bias", None, lambda c: (c.hidden_size,), None),
)

# Not parameters: the causal-mask buffers older transformers versions saved.
IGNORED = (
    re.compile(r"h\.\d+\.attn\.(bias|masked_bias)"),
)

# GPT-2's output projection is always wte; a checkpoint's lm_head.weight is that copy.
TIED_DUPLICATES = ("lm_head.weight",)


def normalize_name(name: str) -> str:
    """Drops the "transformer." prefix so both checkpoint spellings match TABLE."""
    return name[len("transformer."):] if name.startswith("transformer.") else name
