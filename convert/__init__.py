"""jaxpaged.convert: Hugging Face / GGUF checkpoints -> JAX params, and the converted-params cache.

    from jaxpaged.convert import load_model
    m = load_model("smollm2-135m-instruct", dtype="float32")   # or an HF dir, or a .gguf file
    m.config, m.params, m.tokenizer, m.source, m.from_cache

`python -m jaxpaged.convert MODEL` converts once into the cache (see cache.py).
"""
from jaxpaged.convert.cache import FORMAT_VERSION, cache_key, cache_root, ensure_cached
from jaxpaged.convert.loader import (LoadedModel, convert_source, convert_tensors, load_model, load_tokenizer,
                                     param_shapes)
from jaxpaged.convert.resolve import BUILTIN_MODELS, ModelSource, resolve_model

__all__ = ["BUILTIN_MODELS", "FORMAT_VERSION", "LoadedModel", "ModelSource", "cache_key", "cache_root",
           "convert_source", "convert_tensors", "ensure_cached", "load_model", "load_tokenizer",
           "param_shapes", "resolve_model"]
