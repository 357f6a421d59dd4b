"""A directory of named numpy arrays, one `.npy` file each, read back memory-mapped.

The converted-params cache keeps its params this way (convert/cache.py). A warm start then reads
them at page-cache speed: `np.load(mmap_mode="r")` maps each file and nothing is copied until the
arrays are put on the device. (Orbax, which kept them before, cost ~2 s to import and restored the
135M model's 513 MiB at ~95 MiB/s: BENCHMARKS.md "Start-up".)

File names are the array paths percent-quoted ("layers/q_proj/kernel" -> "layers%2Fq_proj%2Fkernel.npy"),
so any path maps to one file and back. numpy cannot describe ml_dtypes' types (bfloat16, float8_*)
in a .npy header; such arrays are stored as unsigned integers of the same width and viewed back as the
dtype the reader expects.
"""
from __future__ import annotations

import os
from urllib.parse import quote

import numpy as np


def _file(directory: str, path: str) -> str:
    return os.path.join(directory, quote(path, safe="") + ".npy")


def _storable(dtype: np.dtype) -> np.dtype:
    """The dtype an array of `dtype` is written as (ml_dtypes' types: a same-width unsigned int)."""
    return np.dtype(f"u{dtype.itemsize}") if dtype.kind == "V" else dtype


def save_arrays(directory: str, arrays: dict[str, np.ndarray]) -> None:
    """Writes every array of {path: array} into `directory` (created)."""
    os.makedirs(directory, exist_ok=True)
    for path, arr in arrays.items():
        arr = np.ascontiguousarray(arr)
        np.save(_file(directory, path), arr.view(_storable(arr.dtype)), allow_pickle=False)


def load_arrays(directory: str, layout: dict[str, tuple]) -> dict[str, np.ndarray]:
    """{path: read-only array} for every path of layout {path: (shape, dtype)}, memory-mapped.
    Raises ValueError when a file is missing, truncated, or holds another shape or dtype."""
    out = {}
    for path, (shape, dtype) in layout.items():
        dtype = np.dtype(dtype)
        try:
            arr = np.load(_file(directory, path), mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:          # missing, truncated (mmap past the end), bad header
            raise ValueError(f"array {path!r}: {type(e).__name__}: {e}") from None
        if arr.dtype != _storable(dtype) or tuple(arr.shape) != tuple(shape):
            raise ValueError(f"array {path!r}: stored {arr.shape} {arr.dtype}, expected {tuple(shape)} {dtype}")
        out[path] = np.asarray(arr).view(dtype)     # a plain ndarray over the mapping
    extra = set(os.listdir(directory)) - {os.path.basename(_file(directory, p)) for p in layout}
    if extra:
        raise ValueError(f"unexpected files {sorted(extra)[:5]}")
    return out
