"""load_model: model name/path -> LoadedModel(config, params, tokenizer), through the cache when possible.

Flow of `load_model(model, dtype)`:
  1. `resolve_model` finds the source (HF dir / .gguf / built-in name) and checks its files exist;
  2. if a complete cache entry for (source content, dtype, FORMAT_VERSION) exists, params, config and
     tokenizer come from it and the source weights are not read;
  3. otherwise `convert_source` reads the config (config.json, or GGUF metadata) and the tensors, and
     `convert_tensors` maps them through the family's CHECKPOINT_TABLE (jaxpaged/models/<family>.py)
     into the nested param dict; with `write_cache=True` the result is stored as a new cache entry.

`convert_tensors` is where "every checkpoint tensor consumed, every param filled" is enforced: names are
matched against the table before any tensor is read, so a wrong checkpoint fails fast, naming the
tensor or param.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

import numpy as np

from jaxpaged.config import ModelConfig, check_dtype
from jaxpaged.convert.resolve import ModelSource, read_json, resolve_model


@dataclasses.dataclass
class LoadedModel:
    config: ModelConfig
    params: dict          # nested dict of numpy arrays in `dtype` (docs/ARCHITECTURE.md "Parameters")
    tokenizer: Any        # transformers PreTrainedTokenizerFast
    source: ModelSource
    from_cache: bool
    cache_entry: str | None = None   # the converted-params cache entry read or written (packed weights go beside it)


def numpy_dtype(dtype: str):
    """numpy dtype of a canonical dtype name (bfloat16 via ml_dtypes)."""
    if check_dtype(dtype) == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(np.float32)


# ----------------------------------------------------------------------------- the family tables

@dataclasses.dataclass(frozen=True)
class _Row:
    hf: str            # HF name, "{i}" for the layer index
    path: str          # param path, "/"-separated
    transform: str | None
    shape: tuple       # per-layer shape (without the leading L of stacked params)
    stacked: bool


def _rows(config: ModelConfig) -> list[_Row]:
    """The family table's rows that apply to this config."""
    rows = []
    for hf, path, transform, shape_fn, when in config.family.CHECKPOINT_TABLE:
        if when is not None:
            flag = bool(getattr(config, when.lstrip("!")))
            if flag == when.startswith("!"):
                continue
        rows.append(_Row(hf, path, transform, tuple(shape_fn(config)), "{i}" in hf))
    return rows


def param_shapes(config: ModelConfig) -> dict[str, tuple]:
    """{param path: full shape} of a config, from its family table (stacked params get a leading L)."""
    return {r.path: ((config.num_layers,) + r.shape if r.stacked else r.shape) for r in _rows(config)}


def nest(flat: dict[str, Any]) -> dict:
    """{"a/b/c": x} -> {"a": {"b": {"c": x}}}."""
    out: dict = {}
    for path, value in flat.items():
        node = out
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """Inverse of nest."""
    out = {}
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else key
        out.update(flatten(value, path) if isinstance(value, dict) else {path: value})
    return out


def _plan(config: ModelConfig, names: list[str]) -> dict[str, tuple[_Row, int | None]]:
    """checkpoint name -> (row, layer) for every tensor that becomes a param; raises on leftovers/gaps."""
    family = config.family
    rows = _rows(config)
    exact = {r.hf: r for r in rows if not r.stacked}
    patterns = [(re.compile("^" + re.escape(r.hf).replace(r"\{i\}", r"(\d+)") + "$"), r) for r in rows if r.stacked]
    plan, unused = {}, []
    for name in names:
        hf = family.normalize_name(name)
        if any(p.fullmatch(hf) for p in family.IGNORED):
            continue
        if hf in family.TIED_DUPLICATES and config.tie_word_embeddings:
            continue
        if hf in exact:
            plan[name] = (exact[hf], None)
            continue
        for pattern, row in patterns:
            m = pattern.match(hf)
            if m:
                layer = int(m.group(1))
                if layer >= config.num_layers:
                    raise ValueError(f"checkpoint tensor {name!r}: layer {layer} but the config has "
                                     f"num_layers={config.num_layers}")
                plan[name] = (row, layer)
                break
        else:
            unused.append(name)
    if unused:
        shown = ", ".join(repr(n) for n in unused[:10]) + (f" (+{len(unused) - 10} more)" if len(unused) > 10 else "")
        raise ValueError(f"checkpoint tensors not used by the {config.model_type} parameter map: {shown}")
    have = {(row.path, layer) for row, layer in plan.values()}
    for row in rows:
        layers = range(config.num_layers) if row.stacked else [None]
        missing = [i for i in layers if (row.path, i) not in have]
        if missing:
            where = f" for layers {missing}" if row.stacked else ""
            raise ValueError(f"param {row.path!r} not filled: checkpoint tensor {row.hf!r} missing{where}")
    return plan


def _kept_blocks(plan, weights) -> dict[str, str]:
    """{param path: GGUF block type} of the stacked Linear kernels whose every layer is a block type
    kept quantized (gguf_blocks.BLOCK_BYTES); the rest are dequantized as usual."""
    from jaxpaged.gguf_blocks import BLOCK_BYTES

    types: dict[str, set] = {}
    for name, (row, layer) in plan.items():
        if row.stacked and row.transform == "T":          # HF Linear [out, in]: a kernel
            types.setdefault(row.path, set()).add(weights.qtype(name))
    return {path: t.pop() for path, t in types.items() if len(t) == 1 and next(iter(t)) in BLOCK_BYTES}


def convert_tensors(config: ModelConfig, weights, dtype: str = "float32", progress: bool = False,
                    keep_blocks: bool = False) -> dict:
    """Maps a weight reader (`.names`, `.get(name)`) through the family table into the nested param dict.
    keep_blocks (GGUF readers): Linear kernels in a kept block format become gguf_blocks.GGUFBlocks
    of the file's bytes, never expanded to float."""
    from tqdm.auto import tqdm

    target = numpy_dtype(dtype)
    plan = _plan(config, list(weights.names))
    shapes = param_shapes(config)
    kept = _kept_blocks(plan, weights) if keep_blocks else {}
    out = {path: np.empty(shape, dtype=target) for path, shape in shapes.items() if path not in kept}
    blocks: dict[str, list] = {path: [None] * config.num_layers for path in kept}
    for name in tqdm(list(plan), desc="converting tensors", unit="tensor", disable=not progress):
        row, layer = plan[name]
        if row.path in kept:
            blocks[row.path][layer] = weights.blocks(name)
            continue
        arr = np.asarray(weights.get(name))
        if row.transform == "T":
            arr = arr.T
        if tuple(arr.shape) != row.shape:
            raise ValueError(f"checkpoint tensor {name!r}: expected shape {row.shape} for param {row.path!r} "
                             f"(after transform {row.transform}), got {tuple(arr.shape)}")
        if layer is None:
            out[row.path][...] = arr.astype(target)
        else:
            out[row.path][layer] = arr.astype(target)
    if kept:
        from jaxpaged.gguf_blocks import GGUFBlocks
        for path, qtype in kept.items():
            out[path] = GGUFBlocks(np.stack(blocks[path]), qtype)       # [L, out, row_bytes] uint8
            if tuple(out[path].shape) != shapes[path]:
                raise ValueError(f"param {path!r}: GGUF blocks give shape {out[path].shape}, expected {shapes[path]}")
    return nest(out)


# ----------------------------------------------------------------------------- reading a source

def hf_dir_config(path: str) -> dict:
    """config.json, with eos ids from generation_config.json merged in (config's first)."""
    cfg = read_json(os.path.join(path, "config.json"), required=("model_type",))
    gen_path = os.path.join(path, "generation_config.json")
    if os.path.isfile(gen_path):
        gen = read_json(gen_path)
        ids = []
        for value in (cfg.get("eos_token_id"), gen.get("eos_token_id")):
            for i in (value if isinstance(value, list) else [value]):
                if i is not None and i not in ids:
                    ids.append(i)
        if ids:
            cfg["eos_token_id"] = ids
    return cfg


def model_config_of(cfg: dict, where: str) -> ModelConfig:
    """ModelConfig.from_hf_config with the file named in any error."""
    try:
        return ModelConfig.from_hf_config(cfg)
    except KeyError as e:
        raise ValueError(f"{where}: missing the required field {e.args[0]!r}") from None
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def load_tokenizer(path: str):
    """A transformers fast tokenizer from a local directory (no network)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:
        raise ValueError(f"{path}: could not load a tokenizer (expected tokenizer.json or vocab files): "
                         f"{type(e).__name__}: {e}") from None


def convert_source(source: ModelSource, dtype: str, progress: bool = True, with_tokenizer: bool = True,
                   keep_blocks: bool = False):
    """(ModelConfig, params, tokenizer or None) read from the source itself. keep_blocks: a GGUF
    file's quantized Linear kernels stay in their block format (quantization="gguf")."""
    if source.kind == "gguf":
        from jaxpaged.convert.gguf_io import GGUFFile
        from jaxpaged.convert.gguf_tokenizer import build_tokenizer

        gguf_file = GGUFFile(source.path)
        config = model_config_of(gguf_file.hf_config(), source.path)
        weights = gguf_file.weights()
        tokenizer = build_tokenizer(gguf_file) if with_tokenizer else None
    else:
        from jaxpaged.convert.safetensors_io import open_hf_weights

        config = model_config_of(hf_dir_config(source.path), os.path.join(source.path, "config.json"))
        weights = open_hf_weights(source)
        tokenizer = load_tokenizer(source.path) if with_tokenizer else None
    try:
        params = convert_tensors(config, weights, dtype, progress, keep_blocks=keep_blocks)
    finally:
        weights.close()
    return config, params, tokenizer


def load_model(model: str, dtype: str = "float32", cache_dir: str | None = None, tokenizer: str | None = None,
               progress: bool = True, write_cache: bool = False, quantization: str | None = None) -> LoadedModel:
    """Loads a model's config, params (numpy, in `dtype`) and tokenizer.

    model:       HF directory, .gguf file, or a built-in name ("smollm2-135m-instruct")
    dtype:       "float32" | "bfloat16"
    cache_dir:   cache root (default $JAXPAGED_CACHE or ~/.cache/jaxpaged); a complete entry is used
    tokenizer:   a directory to take the tokenizer from instead of the model's own
    write_cache: store a freshly converted model as a cache entry (the CLI does; tests keep it off)
    quantization: "int8" quantizes every decoder Linear kernel once, at conversion (cached under a
                 key of its own); "gguf" keeps a .gguf file's quantized Linear kernels in their block
                 format (read straight from the memory-mapped file, no cache entry: nothing is converted)
    """
    from jaxpaged.convert import cache

    dtype = check_dtype(dtype)
    source = resolve_model(model)
    if quantization == "gguf":
        if source.kind != "gguf":
            raise ValueError(f"quantization: 'gguf' keeps a .gguf file's blocks; {model!r} is not a GGUF model")
        config, params, tok = convert_source(source, dtype, progress, with_tokenizer=tokenizer is None,
                                             keep_blocks=True)
        if tokenizer is not None:
            tok = load_tokenizer(tokenizer)
        return LoadedModel(config=config, params=params, tokenizer=tok, source=source, from_cache=False)
    root = cache.cache_root(cache_dir)
    hit = cache.read_entry(root, source, dtype, quantization)
    entry = None
    if hit is not None:
        config, params, tok = hit
        from_cache = True
        entry = cache.entry_path(root, source, dtype, quantization)
    else:
        # the source's own tokenizer is needed unless overridden, and always for a cache entry
        config, params, tok = convert_source(source, dtype, progress,
                                             with_tokenizer=tokenizer is None or write_cache)
        if quantization is not None:          # "int8": quantized once here, cached under its own key
            from jaxpaged.quantization import quantize_params
            params = quantize_params(config, params, quantization)
        from_cache = False
        if write_cache:
            entry = cache.write_entry(root, source, dtype, config, params, tok, quantization)
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer)
    return LoadedModel(config=config, params=params, tokenizer=tok, source=source, from_cache=from_cache,
                       cache_entry=entry)
