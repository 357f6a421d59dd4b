"""GPT-2: learned positions, pre-LayerNorm blocks, fused qkv, gelu_new MLP, LM head tied to the
token embedding. HF's Conv1D weights are already [in, out]. Everything about the family is here: its
HF config parsing, its checkpoint names, its tensor-parallel layout and its forward
(models/registry.py lists what a family file defines).

Flow of `forward`: wte + wpe [T, H] -> scan over stacked blocks (LayerNorm -> qkv -> paged attention
-> out proj -> residual -> LayerNorm -> fc -> gelu_new -> proj -> residual) -> ln_f [T, H].
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpaged.attention import AttentionMetadata, AttentionOptions, attention
from jaxpaged.config import ModelConfig
from jaxpaged.models.layers import Embed, LayerNorm, Linear, scan_layers

MODEL_TYPES = ("gpt2",)


def config_from_hf(cfg: dict) -> ModelConfig:
    """A parsed HF config.json dict -> ModelConfig."""
    hidden = cfg["n_embd"]
    eos = cfg.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
    return ModelConfig(
        model_type=cfg["model_type"], vocab_size=cfg["vocab_size"], hidden_size=hidden,
        intermediate_size=cfg.get("n_inner") or 4 * hidden, num_layers=cfg["n_layer"],
        num_heads=cfg["n_head"], num_kv_heads=cfg["n_head"], head_dim=hidden // cfg["n_head"],
        max_position_embeddings=cfg["n_positions"], norm_eps=cfg.get("layer_norm_epsilon", 1e-5),
        tie_word_embeddings=True, attention_bias=True,
        hidden_act=cfg.get("activation_function", "gelu_new"),
        bos_token_id=cfg.get("bos_token_id"), eos_token_ids=eos_ids)


# ---- checkpoint names -> param paths (same columns as the other families; nothing transposed).
# Names are matched without the "transformer." prefix: GPT2LMHeadModel checkpoints carry it, the
# original OpenAI-converted ones (and GPT2Model) do not.
CHECKPOINT_TABLE = (
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
IGNORED = (re.compile(r"h\.\d+\.attn\.(bias|masked_bias)"),)
# The output projection is always wte; a checkpoint's lm_head.weight is that copy.
TIED_DUPLICATES = ("lm_head.weight",)


def normalize_name(name: str) -> str:
    """Drops the "transformer." prefix so both checkpoint spellings match CHECKPOINT_TABLE."""
    return name[len("transformer."):] if name.startswith("transformer.") else name


# ---- tensor parallelism (jaxpaged/sharding.py): param path -> axis split over "tp" (from the end)
TP_SPLIT_AXES = {
    "wte/embedding": -2,              # [V, H]        by vocabulary (also the tied LM head)
    "layers/qkv/kernel": -1,          # [L, H, 3H]    columns regrouped by prepare_tp: [q_i k_i v_i] per shard
    "layers/qkv/bias": -1,
    "layers/attn_out/kernel": -2,     # [L, H, H]     row-parallel (its bias is added once, replicated)
    "layers/fc/kernel": -1,           # [L, H, I]
    "layers/fc/bias": -1,
    "layers/proj/kernel": -2,         # [L, I, H]     row-parallel
}


def prepare_tp(cfg: ModelConfig, params: dict, n: int) -> dict:
    """c_attn's columns [q | k | v] become [q_0 k_0 v_0 | q_1 k_1 v_1 | ...] (q_i: shard i's heads),
    so a contiguous column split hands each device whole heads of all three; GPT2Blocks reads the
    projection as [T, N, 3, H / N]. (numpy in and out; the params cache keeps HF's order.)"""
    def regroup(a):
        a = np.asarray(a)
        grouped = a.reshape(*a.shape[:-1], 3, n, cfg.hidden_size // n)   # [..., (q|k|v), shard, cols]
        return np.ascontiguousarray(np.swapaxes(grouped, -3, -2)).reshape(a.shape)
    layers = params["layers"]
    for leaf, arr in layers["qkv"].items():     # a weight type's fields all end in the columns
        layers["qkv"][leaf] = jax.tree_util.tree_map(regroup, arr)
    return params


ACTIVATIONS = {
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
}


class GPT2Blocks(nnx.Module):
    """All GPT-2 blocks, params stacked on a leading [L] axis; called on one block's slice."""

    def __init__(self, cfg: ModelConfig, *, dtype, stack: int | None):
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.ln_1 = LayerNorm(h, eps=cfg.norm_eps, dtype=dtype, stack=stack)
        self.qkv = Linear(h, 3 * h, bias=True, dtype=dtype, stack=stack)
        self.attn_out = Linear(h, h, bias=True, dtype=dtype, stack=stack)
        self.ln_2 = LayerNorm(h, eps=cfg.norm_eps, dtype=dtype, stack=stack)
        self.fc = Linear(h, i, bias=True, dtype=dtype, stack=stack)
        self.proj = Linear(i, h, bias=True, dtype=dtype, stack=stack)
        self.cfg = cfg

    def __call__(self, x, kv_cache, layer, meta: AttentionMetadata, opts: AttentionOptions):
        """x [T, H] -> ([T, H], kv_cache)."""
        cfg = self.cfg
        t = x.shape[0]
        # qkv columns come grouped per tensor-parallel shard, [q_0 k_0 v_0 | q_1 k_1 v_1 | ...]
        # (prepare_tp; one group, HF's [q | k | v], without tensor parallelism)
        n = opts.tp_size
        qkv = self.qkv(self.ln_1(x)).reshape(t, n, 3, cfg.hidden_size // n)
        q, k, v = (qkv[:, :, i] for i in range(3))                 # each [T, N, H / N]
        shape = (t, cfg.num_heads, cfg.head_dim)
        attn, kv_cache = attention(q.reshape(shape), k.reshape(shape), v.reshape(shape),
                                   kv_cache, layer, meta, opts)
        x = x + self.attn_out(attn.reshape(t, cfg.hidden_size))
        act = ACTIVATIONS[cfg.hidden_act]
        x = x + self.proj(act(self.fc(self.ln_2(x))))
        return x, kv_cache


class GPT2LMHeadModel(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32):
        if cfg.hidden_act not in ACTIVATIONS:
            raise ValueError(f"activation_function: {cfg.hidden_act!r} not supported; "
                             f"supported: {sorted(ACTIVATIONS)}")
        self.cfg = cfg
        self.wte = Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, tied_head=True)
        self.wpe = Embed(cfg.max_position_embeddings, cfg.hidden_size, dtype=dtype)
        self.layers = GPT2Blocks(cfg, dtype=dtype, stack=cfg.num_layers)
        self.ln_f = LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, dtype=dtype)

    def forward(self, token_ids, positions, kv_cache, meta: AttentionMetadata, opts: AttentionOptions):
        """token_ids, positions [T] int32 -> (hidden [T, H] after ln_f, kv_cache)."""
        x = self.wte(token_ids) + self.wpe(positions)

        def body(layer, idx, carry):
            x, kv = carry
            return layer(x, kv, idx, meta, opts)

        x, kv_cache = scan_layers(self.layers, body, (x, kv_cache), valid_rows=meta.query_start[-1])
        return self.ln_f(x), kv_cache

    def logits(self, hidden: jax.Array, rows=None) -> jax.Array:
        """hidden [N, H] -> logits [N, V] f32. rows: real leading rows of hidden (the rest may be 0)."""
        return self.wte.attend(hidden, rows)


MODEL_CLASS = GPT2LMHeadModel
