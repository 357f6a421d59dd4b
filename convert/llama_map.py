"""Llama family (Llama 2/3, Mistral, Qwen2, Qwen3, SmolLM2): HF tensor name -> param path, one table.

Columns of TABLE:
  hf name      "{i}" marks a per-layer tensor; all L of them are stacked into one [L, ...] param
  param path   "/"-separated path in the nested param dict (docs/ARCHITECTURE.md "Parameters")
  transform    "T": transpose (HF nn.Linear stores [out, in]; our kernels are [in, out]); None: as is
  shape        per-layer shape after the transform, from the ModelConfig `c`
  when         None: always; "attention_bias" / "qk_norm": only when that config flag is true;
               "!tie_word_embeddings": only when embeddings are not tied
"""
from __future__ import annotations

import re

TABLE = (
    ("model.embed_tokens.weight", "embed/embedding", None,
     lambda c: (c.vocab_size, c.hidden_size), None),
    ("model.layers.{i}.input_layernorm.weight", "layers/input_norm/scale", None,
     lambda c: (c.hidden_size,), None),
    ("model.layers.{i}.self_attn.q_proj.weight", "layers/q_proj/kernel", "T",
     lambda c: (c.hidden_size, c.num_heads * c.head_dim), None),
    ("model.layers.{i}.self_attn.q_proj.bias", "layers/q_proj/bias", None,
     lambda c: (c.num_heads * c.head_dim,), "attention_bias"),
    ("model.layers.{i}.self_attn.k_proj.weight", "layers/k_proj/kernel", "T",
     lambda c: (c.hidden_size, c.num_kv_heads * c.head_dim), None),
    ("model.layers.{i}.self_attn.k_proj.bias", "layers/k_proj/bias", None,
     lambda c: (c.num_kv_heads * c.head_dim,), "attention_bias"),
    ("model.layers.{i}.self_attn.v_proj.weight", "layers/v_proj/kernel", "T",
     lambda c: (c.hidden_size, c.num_kv_heads * c.head_dim), None),
    ("model.layers.{i}.self_attn.v_proj.bias", "layers/v_proj/bias", None,
     lambda c: (c.num_kv_heads * c.head_dim,), "attention_bias"),
    ("model.layers.{i}.self_attn.o_proj.weight", "layers/o_proj/kernel", "T",
     lambda c: (c.num_heads * c.head_dim, c.hidden_size), None),
    ("model.layers.{i}.self_attn.q_norm.weight", "layers/q_norm/scale", None,
     lambda c: (c.head_dim,), "qk_norm"),
    ("model.layers.{i}.self_attn.k_norm.weight", "layers/k_norm/scale", None,
     lambda c: (c.head_dim,), "qk_norm"),
    ("model.layers.{i}.post_attention_layernorm.weight", "layers/post_attn_norm/scale", None,
     lambda c: (c.hidden_size,), None),
    ("model.layers.{i}.mlp.gate_proj.weight", "layers/gate_proj/kernel", "T",
     lambda c: (c.hidden_size, c.intermediate_size), None),
    ("model.layers.{i}.mlp.up_proj.weight", "layers/up_proj/kernel", "T",
     lambda c: (c.hidden_size, c.intermediate_size), None),
    ("model.layers.{i}.mlp.down_proj.weight", "layers/down_proj/kernel", "T",
     lambda c: (c.intermediate_size, c.hidden_size), None),
    ("model.norm.weight", "final_norm/scale", None,
     lambda c: (c.hidden_size,), None),
    ("lm_head.weight", "lm_head/kernel", "T",
     lambda c: (c.hidden_size, c.vocab_size), "!tie_word_embeddings"),
)

# Checkpoint tensors that are not parameters: buffers some transformers versions saved.
IGNORED = (
    re.compile(r"(model\.)?(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq"),
)

# With tied embeddings the output projection *is* embed/embedding; a checkpoint may still carry a
# copy under this name, which is consumed and dropped.
TIED_DUPLICATES = ("lm_head.weight",)


def normalize_name(name: str) -> str:
    """HF names as they appear in TABLE (the Llama family needs no renaming)."""
    return name
