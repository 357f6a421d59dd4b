"""PEFT LoRA checkpoints (adapter_config.json + adapter_model.safetensors) -> host arrays, numpy only.

For each LoRA target of the family (lora/modules.py) the adapter becomes two stacked arrays:

    a [L, in, R]      PEFT's lora_A.weight [r, in] transposed, zero-padded from r to R = max_lora_rank
    b [L, R, out]     PEFT's lora_B.weight [out, r] transposed, times the module's scale, zero-padded

so that `x @ a @ b` is PEFT's `lora_B(lora_A(x)) * scaling` (scaling = lora_alpha / r, or
lora_alpha / sqrt(r) with use_rslora; rank_pattern / alpha_pattern give per-module r and alpha).
Padding the rank with zeros adds nothing to the product; layers or modules the adapter does not
target are all zero. Folding the scale into b leaves no per-slot scale to apply at run time.

Not cached like base params (convert/cache.py): the conversion is a transpose and a copy of a few MB,
faster than reading a params-cache entry back; the engine keeps each registered adapter in host memory.
Anything this cannot serve exactly is a ValueError naming the field or tensor.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass

import numpy as np

from jaxpaged.config import ModelConfig
from jaxpaged.lora.modules import LoRAModule, lora_modules, match_target

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_TENSOR = re.compile(r"(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$")   # (module, A|B); an adapter-name segment
                                                                 # ("...lora_A.default.weight") is allowed
# adapter_config.json fields whose non-default value changes the math beyond plain LoRA
_UNSUPPORTED = {"use_dora": False, "lora_bias": False, "modules_to_save": None, "layer_replication": None,
                "target_parameters": None, "trainable_token_indices": None, "use_qalora": False,
                "alora_invocation_tokens": None}


@dataclass(frozen=True)
class PeftAdapter:
    """An adapter's host arrays. `arrays[path] = (a [L, in, R], b [L, R, out])` for every LoRA target
    of the family, in `dtype`; `rank` is the adapter's largest r (before padding to R)."""
    arrays: dict
    rank: int
    target_modules: tuple[str, ...]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.arrays.values())


def read_adapter_config(path: str) -> dict:
    file = os.path.join(path, CONFIG_NAME)
    if not os.path.isdir(path):
        raise ValueError(f"lora_path: {path!r} is not a folder")
    if not os.path.isfile(file):
        raise ValueError(f"lora_path: {path!r} has no {CONFIG_NAME}")
    try:
        with open(file) as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"lora_path: {file} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"lora_path: {file} must hold a JSON object")
    return cfg


def check_adapter_config(cfg: dict, modules: dict[str, LoRAModule]) -> None:
    """ValueError naming the field for an adapter this engine cannot serve exactly."""
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"peft_type: {cfg.get('peft_type')!r} adapters are not supported; supported: ['LORA']")
    for field, default in _UNSUPPORTED.items():
        value = cfg.get(field, default)
        if value not in (default, [], {}, False, None):
            raise ValueError(f"{field}: {value!r} is not supported by LoRA serving (plain LoRA only)")
    if cfg.get("bias", "none") != "none":
        raise ValueError(f"bias: {cfg['bias']!r} is not supported; supported: ['none']")
    targets = cfg.get("target_modules")
    if isinstance(targets, (list, tuple)):
        supported = sorted({m.suffix.rsplit(".", 1)[-1] for m in modules.values()})
        for t in targets:
            if not isinstance(t, str) or not match_target(modules, t):
                raise ValueError(f"target_modules: {t!r} is not a LoRA target of this model; "
                                 f"supported: {supported}")
    elif not isinstance(targets, str):     # a str is PEFT's regex or "all-linear": the tensors decide
        raise ValueError(f"target_modules: expected a list of module names or a regex, got {targets!r}")


def _pattern_value(patterns: dict, name: str, default):
    """PEFT's rank_pattern / alpha_pattern: the first key matching the end of the module name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def load_peft_adapter(path: str, cfg: ModelConfig, *, max_rank: int, dtype=np.float32) -> PeftAdapter:
    """The adapter in `path` for a model of checkpoint config `cfg`, padded to rank `max_rank`."""
    from safetensors import safe_open

    from jaxpaged.convert.safetensors_io import check_safetensors

    acfg = read_adapter_config(path)
    modules = lora_modules(cfg)
    check_adapter_config(acfg, modules)
    file = os.path.join(path, WEIGHTS_NAME)
    if not os.path.isfile(file):
        raise ValueError(f"lora_path: {path!r} has no {WEIGHTS_NAME} (adapter_model.bin is not read: "
                         f"it needs torch)")
    check_safetensors(file)
    tensors: dict[tuple[str, int], dict[str, np.ndarray]] = {}
    normalize = cfg.family.normalize_name
    with safe_open(file, framework="numpy") as f:
        for key in f.keys():
            m = _TENSOR.match(normalize(key.removeprefix("base_model.model.")))
            module, layer = _find_module(modules, m.group(1)) if m else (None, None)
            if module is None:
                raise ValueError(f"{WEIGHTS_NAME}: tensor {key!r} is not a LoRA A/B weight of a supported "
                                 f"module (supported: {sorted(mm.suffix for mm in modules.values())})")
            if layer >= cfg.num_layers:
                raise ValueError(f"{WEIGHTS_NAME}: tensor {key!r}: layer {layer} >= num_layers {cfg.num_layers}")
            tensors.setdefault((module.path, layer), {})[m.group(2)] = np.asarray(f.get_tensor(key), np.float32)
    if not tensors:
        raise ValueError(f"{WEIGHTS_NAME}: no LoRA tensors in {file}")
    return _stack(acfg, modules, tensors, cfg.num_layers, max_rank, dtype)


def _find_module(modules: dict[str, LoRAModule], name: str):
    for m in modules.values():
        hit = m.pattern.search(name)
        if hit and (hit.start() == 0 or name[hit.start() - 1] == "."):
            return m, int(hit.group(1))
    return None, None


def _stack(acfg: dict, modules: dict[str, LoRAModule], tensors: dict, num_layers: int, max_rank: int,
           dtype) -> PeftAdapter:
    arrays = {p: (np.zeros((num_layers, m.d_in, max_rank), dtype), np.zeros((num_layers, max_rank, m.d_out), dtype))
              for p, m in modules.items()}
    rank = 0
    targeted = set()
    for (path, layer), ab in tensors.items():
        m = modules[path]
        name = m.hf_name.format(i=layer)
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{WEIGHTS_NAME}: {name} has lora_{''.join(ab)} without its pair")
        a, b = ab["A"], ab["B"]                                   # [r, in], [out, r]
        r = a.shape[0]
        if a.shape != (r, m.d_in) or b.shape != (m.d_out, r):
            raise ValueError(f"{WEIGHTS_NAME}: {name}: lora_A {a.shape} / lora_B {b.shape} do not fit the base "
                             f"layer ([r, {m.d_in}] / [{m.d_out}, r]); was the adapter trained on another model?")
        if r > max_rank:
            raise ValueError(f"max_lora_rank: the adapter's rank {r} ({name}) exceeds max_lora_rank {max_rank}")
        alpha = _pattern_value(acfg.get("alpha_pattern"), name, acfg.get("lora_alpha", 8))
        expected_r = _pattern_value(acfg.get("rank_pattern"), name, acfg.get("r", r))
        if expected_r != r:
            raise ValueError(f"r: adapter_config.json says {expected_r} for {name}, its tensors have rank {r}")
        scale = alpha / math.sqrt(r) if acfg.get("use_rslora") else alpha / r
        arrays[path][0][layer, :, :r] = a.T
        arrays[path][1][layer, :r, :] = b.T * scale
        rank = max(rank, r)
        targeted.add(m.suffix)
    return PeftAdapter(arrays, rank, tuple(sorted(targeted)))
