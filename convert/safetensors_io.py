"""Reading HF checkpoint tensors as numpy: safetensors (single or sharded) and, lazily, pytorch_model.bin.

The engine never imports torch: safetensors are read with `safe_open(framework="numpy")` (bf16 arrives
as `ml_dtypes.bfloat16`); only the pytorch_model.bin path imports torch, inside `TorchBinWeights`.

Every safetensors file's header is checked against its size before any tensor is read, so a truncated
download fails with the file name and the byte counts instead of a crash halfway through a conversion.
"""
from __future__ import annotations

import json
import os
import struct

import numpy as np

HEADER_LIMIT = 100 * 1024 * 1024  # a safetensors header above this is certainly garbage


def check_safetensors(path: str) -> list[str]:
    """Validates a safetensors file's header and size; returns its tensor names (file order).

    Raises ValueError naming the file when it is too short, the header is not JSON, or the data
    section ends before the last tensor does (a truncated file).
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: truncated safetensors file ({size} bytes; expected an 8-byte header length)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(HEADER_LIMIT, size - 8):
            raise ValueError(f"{path}: not a valid safetensors file (header length {header_len} does not fit "
                             f"in a file of {size} bytes; truncated or not safetensors)")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: safetensors header is not valid JSON ({e})") from None
    header.pop("__metadata__", None)
    end = max((int(info["data_offsets"][1]) for info in header.values()), default=0)
    expected = 8 + header_len + end
    if size < expected:
        raise ValueError(f"{path}: truncated safetensors file: the header needs {expected} bytes, "
                         f"the file has {size}")
    return list(header)


class SafetensorsWeights:
    """Tensors of one or more safetensors files, read one at a time as numpy arrays."""

    def __init__(self, files: tuple[str, ...]):
        self._file_of: dict[str, str] = {}
        for path in files:
            for name in check_safetensors(path):
                if name in self._file_of:
                    raise ValueError(f"tensor {name!r} appears in both {self._file_of[name]} and {path}")
                self._file_of[name] = path
        self.names: list[str] = list(self._file_of)
        self._handles: dict = {}

    def get(self, name: str) -> np.ndarray:
        from safetensors import safe_open

        path = self._file_of[name]
        if path not in self._handles:
            self._handles[path] = safe_open(path, framework="numpy")
        return self._handles[path].get_tensor(name)

    def close(self) -> None:
        self._handles.clear()


class TorchBinWeights:
    """Tensors of pytorch_model.bin file(s). Imports torch (only this path does)."""

    def __init__(self, files: tuple[str, ...]):
        try:
            import torch
        except ImportError:
            raise ValueError(f"{files[0]}: reading pytorch_model.bin needs torch, which is not installed; "
                             f"install torch or convert the checkpoint to safetensors") from None
        self._torch = torch
        self._tensors: dict = {}
        for path in files:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # torch raises many types for a damaged file
                raise ValueError(f"{path}: could not read the PyTorch checkpoint ({type(e).__name__}: {e})") from None
            for name, tensor in state.items():
                if name in self._tensors:
                    raise ValueError(f"tensor {name!r} appears twice (again in {path})")
                self._tensors[name] = tensor
        self.names: list[str] = list(self._tensors)

    def get(self, name: str) -> np.ndarray:
        tensor = self._tensors[name].detach().cpu().contiguous()
        if tensor.dtype == self._torch.bfloat16:
            import ml_dtypes
            return tensor.view(self._torch.int16).numpy().view(ml_dtypes.bfloat16)
        return tensor.numpy()

    def close(self) -> None:
        self._tensors.clear()


def open_hf_weights(source):
    """The weight reader of an hf_dir ModelSource."""
    if source.format == "safetensors":
        return SafetensorsWeights(source.files)
    if source.format == "pytorch_bin":
        return TorchBinWeights(source.files)
    raise ValueError(f"{source.path}: unknown weight format {source.format!r}")
