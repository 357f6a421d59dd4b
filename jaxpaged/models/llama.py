"""The Llama family as flax.nnx modules: Llama 2/3 (incl. llama3 rope scaling), Mistral, Qwen2 (q/k/v
bias), Qwen3 (q/k RMSNorm per head), SmolLM2; tied or untied LM head.

Flow of `forward`: embed [T, H] -> scan over stacked decoder layers (each: RMSNorm -> q/k/v -> RoPE ->
paged attention (writes this step's K/V into the cache, reads each sequence's pages) -> o_proj ->
residual -> RMSNorm -> SwiGLU MLP -> residual) -> final RMSNorm [T, H]. `logits` maps selected rows
to [N, V] f32.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpaged.attention import AttentionMetadata, AttentionOptions, attention
from jaxpaged.config import ModelConfig
from jaxpaged.models.layers import (Embed, Linear, RMSNorm, apply_rope, rope_cos_sin, rope_inv_freq,
                                    scan_layers)


class LlamaDecoderLayers(nnx.Module):
    """All decoder layers, params stacked on a leading [L] axis; called on one layer's slice."""

    def __init__(self, cfg: ModelConfig, *, dtype, stack: int | None):
        h, d, i = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
        nh, kvh, bias = cfg.num_heads, cfg.num_kv_heads, cfg.attention_bias
        self.input_norm = RMSNorm(h, eps=cfg.norm_eps, dtype=dtype, stack=stack)
        self.q_proj = Linear(h, nh * d, bias=bias, dtype=dtype, stack=stack)
        self.k_proj = Linear(h, kvh * d, bias=bias, dtype=dtype, stack=stack)
        self.v_proj = Linear(h, kvh * d, bias=bias, dtype=dtype, stack=stack)
        self.o_proj = Linear(nh * d, h, bias=False, dtype=dtype, stack=stack)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, eps=cfg.norm_eps, dtype=dtype, stack=stack)
            self.k_norm = RMSNorm(d, eps=cfg.norm_eps, dtype=dtype, stack=stack)
        self.post_attn_norm = RMSNorm(h, eps=cfg.norm_eps, dtype=dtype, stack=stack)
        self.gate_proj = Linear(h, i, bias=False, dtype=dtype, stack=stack)
        self.up_proj = Linear(h, i, bias=False, dtype=dtype, stack=stack)
        self.down_proj = Linear(i, h, bias=False, dtype=dtype, stack=stack)
        self.cfg = cfg

    def __call__(self, x, cos, sin, kv_cache, layer, meta: AttentionMetadata, opts: AttentionOptions):
        """x [T, H] -> ([T, H], kv_cache)."""
        cfg = self.cfg
        t = x.shape[0]
        h = self.input_norm(x)
        q = self.q_proj(h).reshape(t, cfg.num_heads, cfg.head_dim)
        k = self.k_proj(h).reshape(t, cfg.num_kv_heads, cfg.head_dim)
        v = self.v_proj(h).reshape(t, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        attn, kv_cache = attention(q, k, v, kv_cache, layer, meta, opts)
        x = x + self.o_proj(attn.reshape(t, cfg.num_heads * cfg.head_dim))
        h = self.post_attn_norm(x)
        gate = self.gate_proj(h)
        x = x + self.down_proj(jax.nn.silu(gate) * self.up_proj(h))
        return x, kv_cache


class LlamaForCausalLM(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32):
        self.cfg = cfg
        self.embed = Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, tied_head=cfg.tie_word_embeddings)
        self.layers = LlamaDecoderLayers(cfg, dtype=dtype, stack=cfg.num_layers)
        self.final_norm = RMSNorm(cfg.hidden_size, eps=cfg.norm_eps, dtype=dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False, dtype=dtype, vocab=True)

    def forward(self, token_ids, positions, kv_cache, meta: AttentionMetadata, opts: AttentionOptions):
        """token_ids, positions [T] int32 -> (hidden [T, H] after the final norm, kv_cache)."""
        x = self.embed(token_ids)
        cos, sin = rope_cos_sin(positions, rope_inv_freq(self.cfg))

        def body(layer, idx, carry):
            x, kv = carry
            return layer(x, cos, sin, kv, idx, meta, opts)

        x, kv_cache = scan_layers(self.layers, body, (x, kv_cache), valid_rows=meta.query_start[-1])
        return self.final_norm(x), kv_cache

    def logits(self, hidden: jax.Array, rows=None) -> jax.Array:
        """hidden [N, H] -> logits [N, V] f32. rows: real leading rows of hidden (the rest may be 0)."""
        if self.cfg.tie_word_embeddings:
            return self.embed.attend(hidden, rows)
        return self.lm_head(hidden, rows)
