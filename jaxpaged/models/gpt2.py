"""GPT-2 as flax.nnx modules: learned positions, pre-LayerNorm blocks, fused qkv, gelu_new MLP,
LM head tied to the token embedding. HF's Conv1D weights are already [in, out].

Flow of `forward`: wte + wpe [T, H] -> scan over stacked blocks (LayerNorm -> qkv -> paged attention
-> out proj -> residual -> LayerNorm -> fc -> gelu_new -> proj -> residual) -> ln_f [T, H].
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpaged.attention import AttentionMetadata, AttentionOptions, attention
from jaxpaged.config import ModelConfig
from jaxpaged.models.layers import Embed, LayerNorm, Linear, scan_layers

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
        # (sharding.prepare_params; one group, HF's [q | k | v], without tensor parallelism)
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
