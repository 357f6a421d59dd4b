"""Model families as flax.nnx modules, and the helpers that build them without allocating weights."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpaged.config import ModelConfig


def model_class(cfg: ModelConfig):
    """The nnx Module class of a config's family (models/registry.py)."""
    return cfg.family.MODEL_CLASS


def jnp_dtype(dtype: str):
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]


def abstract_model(cfg: ModelConfig, dtype: str = "float32"):
    """(graphdef, abstract State of jax.ShapeDtypeStruct) — no weights are allocated."""
    cls = model_class(cfg)
    model = nnx.eval_shape(lambda: cls(cfg, dtype=jnp_dtype(dtype)))
    return nnx.split(model)


def abstract_params(cfg: ModelConfig, dtype: str = "float32") -> dict:
    """The params as a nested dict of jax.ShapeDtypeStruct (the layout the converter must fill)."""
    _, state = abstract_model(cfg, dtype)
    return nnx.to_pure_dict(state)


def build_state(cfg: ModelConfig, params: dict, dtype: str = "float32"):
    """(graphdef, State) with the converted params (nested dict of arrays) filled in. A param may also
    be a weight type already (jaxpaged.weights.Weight, e.g. GGUF blocks kept quantized): its logical
    shape is checked.

    Raises ValueError naming any missing/extra param or a shape mismatch.
    """
    from jaxpaged.weights import Weight

    graphdef, state = abstract_model(cfg, dtype)
    expected = nnx.to_pure_dict(state)
    flat_expected = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
    flat_given = dict(jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: isinstance(x, Weight))[0])
    name = jax.tree_util.keystr
    missing = sorted(name(k) for k in flat_expected.keys() - flat_given.keys())
    extra = sorted(name(k) for k in flat_given.keys() - flat_expected.keys())
    if missing or extra:
        raise ValueError(f"params do not match the {cfg.model_type} model: missing {missing}, unexpected {extra}")
    for key, spec in flat_expected.items():
        if tuple(flat_given[key].shape) != tuple(spec.shape):
            raise ValueError(f"param {name(key)}: expected shape {tuple(spec.shape)}, "
                             f"got {tuple(flat_given[key].shape)}")
    nnx.replace_by_pure_dict(state, params)
    return graphdef, state
