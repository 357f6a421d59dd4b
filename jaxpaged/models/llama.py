"""The Llama family: Llama 2/3 (incl. llama3 rope scaling), Mistral, Qwen2 (q/k/v bias), Qwen3 (q/k
RMSNorm per head), SmolLM2; tied or untied LM head. Everything about the family is here: its HF
config parsing, its checkpoint names (HF and GGUF), its tensor-parallel split axes and its forward
(models/registry.py lists what a family file defines).

Flow of `forward`: embed [T, H] -> scan over stacked decoder layers (each: RMSNorm -> q/k/v -> RoPE ->
paged attention (writes this step's K/V into the cache, reads each sequence's pages) -> o_proj ->
residual -> RMSNorm -> SwiGLU MLP -> residual) -> final RMSNorm [T, H]. `logits` maps selected rows
to [N, V] f32.
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpaged.attention import AttentionMetadata, AttentionOptions, attention
from jaxpaged.config import ModelConfig
from jaxpaged.models.layers import (Embed, Linear, RMSNorm, apply_rope, rope_cos_sin, rope_inv_freq,
                                    scan_layers)


MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def _eos_ids(cfg: dict) -> tuple[int, ...]:
    eos = cfg.get("eos_token_id")
    return tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())


def _rope_scaling(cfg: dict) -> dict | None:
    """rope_scaling (or transformers' newer rope_parameters); only "llama3" scaling is supported."""
    rope_scaling = cfg.get("rope_scaling") or None
    rope_params = cfg.get("rope_parameters") or {}
    if rope_scaling is None and rope_params.get("rope_type", "default") not in ("default", None):
        rope_scaling = rope_params
    if rope_scaling is None:
        return None
    kind = rope_scaling.get("rope_type", rope_scaling.get("type"))
    if kind in (None, "default"):
        return None
    if kind != "llama3":
        raise ValueError(f"rope_scaling: type {kind!r} is not supported; supported: ['llama3']")
    return rope_scaling


def config_from_hf(cfg: dict) -> ModelConfig:
    """A parsed HF config.json dict -> ModelConfig."""
    model_type = cfg["model_type"]
    hidden = cfg["hidden_size"]
    heads = cfg["num_attention_heads"]
    rope_scaling = _rope_scaling(cfg)
    theta = cfg.get("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    sliding = cfg.get("sliding_window") if cfg.get("use_sliding_window", model_type == "mistral") else None
    return ModelConfig(
        model_type=model_type, vocab_size=cfg["vocab_size"], hidden_size=hidden,
        intermediate_size=cfg["intermediate_size"], num_layers=cfg["num_hidden_layers"],
        num_heads=heads, num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or hidden // heads,
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
        rope_scaling=tuple(sorted(rope_scaling.items())) if rope_scaling else None,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
        qk_norm=model_type == "qwen3", hidden_act=cfg.get("hidden_act", "silu"),
        sliding_window=sliding, bos_token_id=cfg.get("bos_token_id"), eos_token_ids=_eos_ids(cfg))


# ---- checkpoint names -> param paths (convert/loader.py). Columns: HF name ("{i}": per layer,
# stacked into one [L, ...] param), param path, transform ("T": HF nn.Linear is [out, in], our
# kernels [in, out]), per-layer shape, when (None: always; a config flag; "!flag": when false).
CHECKPOINT_TABLE = (
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
IGNORED = (re.compile(r"(model\.)?(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq"),)
# With tied embeddings the output projection *is* embed/embedding; a checkpoint may still carry a
# copy under this name, which is consumed and dropped.
TIED_DUPLICATES = ("lm_head.weight",)


def normalize_name(name: str) -> str:
    """HF names as they appear in CHECKPOINT_TABLE (this family needs no renaming)."""
    return name


# ---- tensor parallelism (jaxpaged/sharding.py): param path -> axis split over "tp" (from the end,
# so stacked [L, ...] and unstacked params read the same). Megatron layout: q/k/v, gate/up
# column-parallel (whole heads / a slice of I per device), o/down row-parallel, vocab tables by V.
TP_SPLIT_AXES = {
    "embed/embedding": -2,            # [V, H]        by vocabulary
    "lm_head/kernel": -1,             # [H, V]        by vocabulary
    "layers/q_proj/kernel": -1,       # [L, H, NH*D]  column-parallel: whole query heads
    "layers/q_proj/bias": -1,
    "layers/k_proj/kernel": -1,       # [L, H, KVH*D] whole KV heads
    "layers/k_proj/bias": -1,
    "layers/v_proj/kernel": -1,
    "layers/v_proj/bias": -1,
    "layers/o_proj/kernel": -2,       # [L, NH*D, H]  row-parallel
    "layers/gate_proj/kernel": -1,    # [L, H, I]     column-parallel
    "layers/up_proj/kernel": -1,
    "layers/down_proj/kernel": -2,    # [L, I, H]     row-parallel
}


# ---- GGUF (llama.cpp) files of this architecture (convert/gguf_io.py reads the file)
GGUF_ARCHITECTURES = ("llama",)
# GGUF per-block tensor name (after "blk.{i}.") -> HF name (after "model.layers.{i}.")
GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
GGUF_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def gguf_to_hf_name(name: str) -> str | None:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`; None when unknown."""
    stem, _, kind = name.rpartition(".")
    if kind not in ("weight", "bias"):
        return None
    if stem.startswith("blk."):
        _, layer, part = stem.split(".", 2)
        if layer.isdigit() and part in GGUF_LAYER_NAMES:
            return f"model.layers.{layer}.{GGUF_LAYER_NAMES[part]}.{kind}"
        return None
    if stem in GGUF_GLOBAL_NAMES:
        return f"{GGUF_GLOBAL_NAMES[stem]}.{kind}"
    return None


def gguf_config(f) -> dict:
    """The HF config.json-style dict of a GGUF file `f` (convert.gguf_io.GGUFFile) of this family."""
    arch = f.architecture
    names = set(f.tensor_names)
    if "rope_freqs.weight" in names:
        raise ValueError(f"{f.path}: tensor rope_freqs.weight (llama.cpp's form of Llama-3.1 rope scaling) "
                         f"is not supported yet; use the Hugging Face checkpoint instead")
    scaling = f.get(f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        raise ValueError(f"{f.path}: {arch}.rope.scaling.type = {scaling!r} is not supported; "
                         f"supported: ['none']")
    heads = int(f.require(f"{arch}.attention.head_count"))
    hidden = int(f.require(f"{arch}.embedding_length"))
    return {
        "model_type": arch,
        "vocab_size": f.vocab_size(),
        "hidden_size": hidden,
        "intermediate_size": int(f.require(f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(f.require(f"{arch}.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(f.get(f"{arch}.attention.head_count_kv", heads)),
        "head_dim": int(f.get(f"{arch}.attention.key_length", hidden // heads)),
        "max_position_embeddings": int(f.get(f"{arch}.context_length", 2048)),
        "rms_norm_eps": float(f.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(f.get(f"{arch}.rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in names,
        "hidden_act": "silu",
        **f.special_token_ids(),
    }


def gguf_tensor(cfg: dict, name: str, w):
    """A dequantized GGUF tensor as its HF twin: llama.cpp's converter permuted the rows of q/k
    inside every head (see convert.gguf_io.unpermute_qk); undone here."""
    from jaxpaged.convert.gguf_io import unpermute_qk
    part = name.split(".")[2] if name.startswith("blk.") else ""
    heads = {"attn_q": cfg["num_attention_heads"], "attn_k": cfg["num_key_value_heads"]}
    return unpermute_qk(w, heads[part]) if part in heads else w


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


MODEL_CLASS = LlamaForCausalLM
