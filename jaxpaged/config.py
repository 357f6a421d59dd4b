"""Frozen, hashable configuration: the model's architecture (from a Hugging Face config)."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

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

    `model_type` is the HF name; `family` the module that serves it (models/registry.py). Fields are
    the union of what the families read; each family's config_from_hf fills them.
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
        from jaxpaged.models.registry import family_of_model_type
        family_of_model_type(self.model_type)      # ValueError naming model_type when unsupported
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_kv_heads: {self.num_kv_heads} must divide num_heads {self.num_heads}")

    @property
    def family(self):
        """The family module (jaxpaged/models/<family>.py) serving this model_type."""
        from jaxpaged.models.registry import family_of_model_type
        return family_of_model_type(self.model_type)

    @property
    def rope_scaling_dict(self) -> dict | None:
        return dict(self.rope_scaling) if self.rope_scaling else None

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "ModelConfig":
        """Builds a ModelConfig from a parsed HF config.json dict (its family's parser)."""
        from jaxpaged.models.registry import family_of_model_type
        return family_of_model_type(cfg.get("model_type")).config_from_hf(cfg)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        d = json.loads(text)
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = tuple(tuple(kv) for kv in d["rope_scaling"])
        d["eos_token_ids"] = tuple(d.get("eos_token_ids") or ())
        return cls(**d)
