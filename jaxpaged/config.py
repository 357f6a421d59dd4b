"""Frozen, hashable configuration: the model's architecture (from a Hugging Face config)."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

# model_type in a HF config.json -> our family module (jaxpaged/models/<family>.py)
FAMILY_OF_MODEL_TYPE = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "qwen3": "llama",
    "gpt2": "gpt2",
}
SUPPORTED_MODEL_TYPES = tuple(sorted(FAMILY_OF_MODEL_TYPE))
DTYPES = ("float32", "bfloat16")


def check_dtype(dtype: str) -> str:
    """Returns the canonical dtype name; raises ValueError naming the field otherwise."""
    aliases = {"float32": "float32", "fp32": "float32", "f32": "float32", "auto": "float32",
               "bfloat16": "bfloat16", "bf16": "bfloat16"}
    name = str(getattr(dtype, "__name__", dtype)).lower()
    if name not in aliases:
        raise ValueError(f"dtype: expected one of {list(DTYPES)}, got {dtype!r}")
    return aliases[name]


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of one model. Hashable: it is a static argument of jitted code.

    `family` picks the module file ("llama" or "gpt2"); `model_type` is the HF name.
    """
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # rope_scaling as a sorted tuple of (key, value) pairs so the config stays hashable
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False      # q/k/v projections carry a bias (Qwen2)
    qk_norm: bool = False             # RMSNorm over each head of q and k (Qwen3)
    hidden_act: str = "silu"
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.model_type not in FAMILY_OF_MODEL_TYPE:
            raise ValueError(
                f"model_type: {self.model_type!r} is not supported; supported: {list(SUPPORTED_MODEL_TYPES)}")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_kv_heads: {self.num_kv_heads} must divide num_heads {self.num_heads}")

    @property
    def family(self) -> str:
        return FAMILY_OF_MODEL_TYPE[self.model_type]

    @property
    def rope_scaling_dict(self) -> dict | None:
        return dict(self.rope_scaling) if self.rope_scaling else None

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "ModelConfig":
        """Builds a ModelConfig from a parsed HF config.json dict."""
        model_type = cfg.get("model_type")
        if model_type not in FAMILY_OF_MODEL_TYPE:
            raise ValueError(
                f"model_type: {model_type!r} is not supported; supported: {list(SUPPORTED_MODEL_TYPES)}")
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        if model_type == "gpt2":
            hidden = cfg["n_embd"]
            return cls(
                model_type="gpt2", vocab_size=cfg["vocab_size"], hidden_size=hidden,
                intermediate_size=cfg.get("n_inner") or 4 * hidden, num_layers=cfg["n_layer"],
                num_heads=cfg["n_head"], num_kv_heads=cfg["n_head"], head_dim=hidden // cfg["n_head"],
                max_position_embeddings=cfg["n_positions"], norm_eps=cfg.get("layer_norm_epsilon", 1e-5),
                tie_word_embeddings=True, attention_bias=True,
                hidden_act=cfg.get("activation_function", "gelu_new"),
                bos_token_id=cfg.get("bos_token_id"), eos_token_ids=eos_ids)
        hidden = cfg["hidden_size"]
        heads = cfg["num_attention_heads"]
        rope_scaling = cfg.get("rope_scaling") or None
        rope_params = cfg.get("rope_parameters") or {}
        if rope_scaling is None and rope_params.get("rope_type", "default") not in ("default", None):
            rope_scaling = rope_params
        if rope_scaling is not None:
            kind = rope_scaling.get("rope_type", rope_scaling.get("type"))
            if kind in (None, "default"):
                rope_scaling = None
            elif kind != "llama3":
                raise ValueError(f"rope_scaling: type {kind!r} is not supported; supported: ['llama3']")
        theta = cfg.get("rope_theta", rope_params.get("rope_theta", 10000.0))
        sliding = cfg.get("sliding_window") if cfg.get("use_sliding_window", model_type == "mistral") else None
        return cls(
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
            sliding_window=sliding, bos_token_id=cfg.get("bos_token_id"), eos_token_ids=eos_ids)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        d = json.loads(text)
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = tuple(tuple(kv) for kv in d["rope_scaling"])
        d["eos_token_ids"] = tuple(d.get("eos_token_ids") or ())
        return cls(**d)
