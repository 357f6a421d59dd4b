"""Default sampling parameters from a model's `generation_config.json` (vLLM's `--generation-config`).

    EngineConfig.generation_config = "auto"   the model's file, when it has one (the default, as in vLLM)
                                   = "vllm"   ignore it: SamplingParams' own defaults
                                   = a folder read that folder's generation_config.json

Only the keys a model creator sets to recommend sampling are taken, renamed to SamplingParams fields;
everything else in the file (token ids, transformers' version, beam settings) is ignored. The result
fills the fields a request leaves unset: `LLM.generate(prompts)` without SamplingParams, and the
server's requests that do not send them. `LLM.get_default_sampling_params()` returns them.
"""
from __future__ import annotations

import json
import os

# generation_config.json key -> SamplingParams field
KEYS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
        "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}
MODES = ("auto", "vllm")


def check_generation_config(value: str) -> None:
    if value not in MODES and not os.path.isdir(value):
        raise ValueError(f"generation_config: expected 'auto', 'vllm' or a folder holding generation_config.json, "
                         f"got {value!r}")


def sampling_defaults(model: str, mode: str = "auto") -> dict:
    """{SamplingParams field: value} recommended by the model's generation_config.json ({} when none)."""
    if mode == "vllm":
        return {}
    folder = mode if mode != "auto" else _model_folder(model)
    if folder is None:
        return {}
    path = os.path.join(folder, "generation_config.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"generation_config: cannot read {path}: {e}") from None
    return {field: data[key] for key, field in KEYS.items() if data.get(key) is not None}


def _model_folder(model: str) -> str | None:
    """The Hugging Face directory of a model (None for a GGUF file or a built-in name: they carry no file)."""
    from jaxpaged.convert.resolve import resolve_model

    source = resolve_model(model)
    return source.path if source.kind == "hf_dir" else None
