"""The model families: one module each under jaxpaged/models, listed here (one line per family).

A family module defines, beside its flax.nnx modules (`MODEL_CLASS`):
  MODEL_TYPES            the HF `model_type`s it serves
  config_from_hf(d)      HF config.json dict -> ModelConfig
  CHECKPOINT_TABLE       HF tensor name -> param path rows (convert/loader.py reads them), with
                         IGNORED, TIED_DUPLICATES and normalize_name(name)
  TP_SPLIT_AXES          param path -> the axis split over the "tp" mesh (jaxpaged/sharding.py)
  prepare_tp(cfg, params, n)   optional: host-side layout changes tensor parallelism needs
  GGUF_ARCHITECTURES, gguf_config(file), gguf_to_hf_name(name), gguf_tensor(file, name, w)
                         optional: reading llama.cpp's GGUF files of that architecture
Adding a family: a new file with those names, and its module path in FAMILY_MODULES.
"""
from __future__ import annotations

import functools
import importlib

FAMILY_MODULES = (
    "jaxpaged.models.llama",
    "jaxpaged.models.gpt2",
)


@functools.cache
def families() -> tuple:
    return tuple(importlib.import_module(name) for name in FAMILY_MODULES)


def supported_model_types() -> list[str]:
    return sorted(t for f in families() for t in f.MODEL_TYPES)


def family_of_model_type(model_type: str):
    """The family module serving a HF model_type; ValueError naming the field otherwise."""
    for fam in families():
        if model_type in fam.MODEL_TYPES:
            return fam
    raise ValueError(f"model_type: {model_type!r} is not supported; supported: {supported_model_types()}")


def family_of_gguf(architecture: str, where: str):
    """The family reading GGUF files of `architecture` (general.architecture)."""
    for fam in families():
        if architecture in getattr(fam, "GGUF_ARCHITECTURES", ()):
            return fam
    supported = sorted(a for f in families() for a in getattr(f, "GGUF_ARCHITECTURES", ()))
    raise ValueError(f"{where}: GGUF architecture {architecture!r} is not supported; supported: {supported}")
