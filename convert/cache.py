"""The converted-params cache: params + config + tokenizer per (source, dtype, format).

Layout of an entry `<root>/<key>/`:
  params/              one .npy per param array, read back memory-mapped (convert/array_store.py;
                       format 1 entries were Orbax checkpoints: too slow to import and read at start)
  model_config.json    ModelConfig.to_json()
  tokenizer/           tokenizer.save_pretrained(); read back by jaxpaged/tokenizer.py
  source.json          where it came from (for people; not read back)
  COMPLETE             written last: format version, dtype and every param's shape/dtype

The key: `<name>-<dtype>-v<FORMAT_VERSION>-<digest>`, the digest a sha256 over each source file's
name, size, mtime (ns), first MiB and last MiB. Hashing whole files of many GB would take longer
than a cached start should; size + mtime + both ends catches replaced, re-downloaded, truncated and
edited files (an edit changes the mtime) at the cost of 2 MiB read per file. A copy of a model
(new mtime) gets a new entry.

Writing: into `<root>/.tmp-<key>-<random>`, COMPLETE last, then one atomic rename to `<root>/<key>`;
a failure removes the temp dir, so a reader never sees half an entry. Reading: an entry without
COMPLETE, with a different manifest, or whose params are missing, truncated or of other shapes, is removed
and reported as a miss (the caller rebuilds it).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time

import numpy as np

from jaxpaged.config import ModelConfig
from jaxpaged.convert.array_store import load_arrays, save_arrays
from jaxpaged.convert.loader import flatten, nest, numpy_dtype, param_shapes
from jaxpaged.convert.resolve import ModelSource

FORMAT_VERSION = 2      # 2: params as .npy files (1: an Orbax checkpoint)
SAMPLE_BYTES = 1 << 20
STALE_TMP_SECONDS = 24 * 3600
log = logging.getLogger(__name__)


class CorruptEntry(Exception):
    """A cache entry that must not be used."""


def cache_root(cache_dir: str | None = None) -> str:
    """The cache root: `cache_dir`, else $JAXPAGED_CACHE, else ~/.cache/jaxpaged."""
    root = cache_dir or os.environ.get("JAXPAGED_CACHE") or os.path.join("~", ".cache", "jaxpaged")
    return os.path.abspath(os.path.expanduser(root))


def source_digest(source: ModelSource) -> str:
    """sha256 (hex) over name, size, mtime and first/last MiB of every weight and metadata file."""
    h = hashlib.sha256()
    for path in sorted(source.files + source.metadata_files):
        st = os.stat(path)
        h.update(f"{os.path.basename(path)}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
        with open(path, "rb") as f:
            h.update(f.read(SAMPLE_BYTES))
            if st.st_size > SAMPLE_BYTES:
                f.seek(max(SAMPLE_BYTES, st.st_size - SAMPLE_BYTES))
                h.update(f.read(SAMPLE_BYTES))
    return h.hexdigest()


def cache_key(source: ModelSource, dtype: str, scheme: str | None = None) -> str:
    """`<name>-<dtype>[-<quantization scheme>]-v<FORMAT_VERSION>-<digest>`."""
    name = os.path.basename(source.path.rstrip(os.sep))
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.splitext(name)[0] if source.kind == "gguf" else name)
    variant = f"{dtype}-{scheme}" if scheme else dtype
    return f"{name[:48]}-{variant}-v{FORMAT_VERSION}-{source_digest(source)[:24]}"


def entry_path(root: str, source: ModelSource, dtype: str, scheme: str | None = None) -> str:
    return os.path.join(root, cache_key(source, dtype, scheme))


def _stored_layout(config: ModelConfig, dtype: str, scheme: str | None) -> dict[str, tuple]:
    """{stored array path: (shape, numpy dtype)} of an entry. Under "int8" a quantized kernel path p
    is stored as p/q (int8, the kernel's shape) and p/scale (f32, [(L,) N])."""
    target = numpy_dtype(dtype)
    layout = {p: (shape, target) for p, shape in param_shapes(config).items()}
    if scheme == "int8":
        from jaxpaged.quantization import int8_kernel_paths
        for p in int8_kernel_paths(config):
            shape, _ = layout.pop(p)
            layout[p + "/q"] = (shape, np.dtype(np.int8))
            layout[p + "/scale"] = (shape[:-2] + shape[-1:], np.dtype(np.float32))
    return layout


def _manifest(config: ModelConfig, dtype: str, scheme: str | None = None) -> dict:
    out = {"format_version": FORMAT_VERSION, "dtype": dtype,
           "params": {p: list(s) for p, (s, _) in sorted(_stored_layout(config, dtype, scheme).items())}}
    if scheme:
        out["quantization"] = scheme
    return out


def _to_stored(params: dict) -> dict:
    """{stored path: array}: weight-type leaves (Int8Weight) as their arrays."""
    from jaxpaged.quantization import Int8Weight
    flat = {}
    for p, x in flatten(params).items():
        if isinstance(x, Int8Weight):
            flat[p + "/q"], flat[p + "/scale"] = np.asarray(x.q), np.asarray(x.scale)
        else:
            flat[p] = x
    return flat


def _from_stored(flat: dict, scheme: str | None) -> dict:
    if scheme == "int8":
        from jaxpaged.quantization import Int8Weight
        for p in [p[:-2] for p in flat if p.endswith("/q")]:
            flat[p] = Int8Weight(flat.pop(p + "/q"), flat.pop(p + "/scale"))
    return nest(flat)


def _restore(entry: str, dtype: str, scheme: str | None = None):
    """(config, params, tokenizer) of an entry; CorruptEntry when anything is off."""
    from jaxpaged.tokenizer import load_entry_tokenizer

    marker = os.path.join(entry, "COMPLETE")
    if not os.path.isfile(marker):
        raise CorruptEntry("no COMPLETE marker (half-written)")
    try:
        with open(marker) as f:
            manifest = json.load(f)
        with open(os.path.join(entry, "model_config.json")) as f:
            config = ModelConfig.from_json(f.read())
    except (OSError, ValueError, TypeError) as e:
        raise CorruptEntry(f"unreadable marker or config ({e})") from None
    if manifest != _manifest(config, dtype, scheme):
        raise CorruptEntry("manifest does not match the config's params")
    try:
        flat = load_arrays(os.path.join(entry, "params"), _stored_layout(config, dtype, scheme))
    except (OSError, ValueError) as e:
        raise CorruptEntry(f"params unreadable ({e})") from None
    try:
        # the Rust tokenizer directly when that is exact (no transformers import: jaxpaged/tokenizer.py)
        tokenizer = load_entry_tokenizer(os.path.join(entry, "tokenizer"))
    except Exception as e:
        raise CorruptEntry(f"tokenizer unreadable ({type(e).__name__}: {e})") from None
    return config, _from_stored(flat, scheme), tokenizer


def read_entry(root: str, source: ModelSource, dtype: str, scheme: str | None = None):
    """(config, params, tokenizer) from a complete entry, else None (a bad entry is removed)."""
    entry = entry_path(root, source, dtype, scheme)
    if not os.path.isdir(entry):
        return None
    try:
        return _restore(entry, dtype, scheme)
    except CorruptEntry as e:
        log.warning("jaxpaged cache: removing unusable entry %s: %s", entry, e)
        shutil.rmtree(entry, ignore_errors=True)
        return None


def write_entry(root: str, source: ModelSource, dtype: str, config: ModelConfig, params: dict, tokenizer,
                scheme: str | None = None) -> str:
    """Writes an entry atomically; returns its path. An existing complete entry is kept.
    scheme: the quantization the params carry ("int8": Int8Weight kernels), part of the key."""
    os.makedirs(root, exist_ok=True)
    _remove_stale_tmp(root)
    key = cache_key(source, dtype, scheme)
    final = os.path.join(root, key)
    tmp = tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=root)
    try:
        save_arrays(os.path.join(tmp, "params"), _to_stored(params))
        with open(os.path.join(tmp, "model_config.json"), "w") as f:
            f.write(config.to_json())
        with open(os.path.join(tmp, "source.json"), "w") as f:
            json.dump({"kind": source.kind, "path": source.path, "files": list(source.files),
                       "format": source.format, "dtype": dtype, "quantization": scheme,
                       "created": time.time()}, f, indent=1)
        tokenizer.save_pretrained(os.path.join(tmp, "tokenizer"))
        with open(os.path.join(tmp, "COMPLETE"), "w") as f:
            json.dump(_manifest(config, dtype, scheme), f)
            f.flush()
            os.fsync(f.fileno())
        if os.path.isdir(final):
            # someone else finished first, or an unusable entry sits there
            if os.path.isfile(os.path.join(final, "COMPLETE")):
                shutil.rmtree(tmp, ignore_errors=True)
                return final
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:
            if not os.path.isfile(os.path.join(final, "COMPLETE")):
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # lost a race to an identical complete entry
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _remove_stale_tmp(root: str) -> None:
    """Removes temp dirs left by crashed writers (older than a day, so live writers are safe)."""
    now = time.time()
    for name in os.listdir(root):
        path = os.path.join(root, name)
        if name.startswith(".tmp-") and os.path.isdir(path):
            try:
                if now - os.path.getmtime(path) > STALE_TMP_SECONDS:
                    shutil.rmtree(path, ignore_errors=True)
            except OSError:
                pass


def ensure_cached(model: str, dtype: str = "float32", cache_dir: str | None = None, progress: bool = True,
                  force: bool = False) -> str:
    """Converts `model` into the cache unless a complete entry exists; returns the entry path (the CLI)."""
    from jaxpaged.config import check_dtype
    from jaxpaged.convert.loader import convert_source
    from jaxpaged.convert.resolve import resolve_model

    dtype = check_dtype(dtype)
    source = resolve_model(model)
    root = cache_root(cache_dir)
    entry = entry_path(root, source, dtype)
    if force and os.path.isdir(entry):
        shutil.rmtree(entry, ignore_errors=True)
    if read_entry(root, source, dtype) is not None:
        return entry
    config, params, tokenizer = convert_source(source, dtype, progress)
    return write_entry(root, source, dtype, config, params, tokenizer)
