"""Packed weights as part of a converted-params cache entry, so a warm start does not repack them.

A backend with its own matmul (native CPU) lays weights out once at load (backends/layout.py); that
layout depends on the machine's kernel flavour (instruction set, dtype, packing format), not only on
the params. It is kept beside the params of the entry it was made from:

    <entry>/packed/<flavour>/           flavour: the backend's `pack_flavour(dtype)`, e.g. float32-caps1-p1
        <param key>.npy                 the packed array of each weight (key: module path + param name)
        manifest.json                   {key: {"k": K, "n": N, "shape": [...], "dtype": "..."}}
        COMPLETE                        written last

Written into `<entry>/packed/.tmp-<flavour>-<random>` and renamed into place whole, so a reader sees
all of a flavour or nothing; an entry is immutable once complete, and removing it (cache.read_entry
on a damaged entry) removes its packed forms with it.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile

import numpy as np

log = logging.getLogger(__name__)


def _file_name(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", ".", key) + ".npy"


class PackedCache:
    """The packed weights of one cache entry for one kernel flavour: read what is there, write what is missing.

    get(key) -> (array, meta) or None; put(key, array, meta) while packing; commit() once every weight
    is in (a flavour already complete on disk is never rewritten). `hits` / `misses` count get() results.
    """

    def __init__(self, entry: str, flavour: str):
        self.root = os.path.join(entry, "packed")
        self.final = os.path.join(self.root, re.sub(r"[^A-Za-z0-9_.-]+", "_", flavour))
        self.hits = self.misses = 0
        self._manifest = self._read_manifest()
        self._tmp: str | None = None
        self._new: dict[str, dict] = {}

    def _read_manifest(self) -> dict:
        try:
            if not os.path.isfile(os.path.join(self.final, "COMPLETE")):
                return {}
            with open(os.path.join(self.final, "manifest.json")) as f:
                return json.load(f)
        except (OSError, ValueError) as e:
            log.warning("jaxpaged cache: ignoring unreadable packed weights in %s: %s", self.final, e)
            return {}

    def get(self, key: str):
        """(numpy array, meta dict) of a packed weight, or None when this flavour lacks it."""
        meta = self._manifest.get(key)
        if meta is not None:
            try:
                arr = np.load(os.path.join(self.final, _file_name(key)), mmap_mode="r")
                if list(arr.shape) == meta["shape"] and str(arr.dtype) == meta["dtype"]:
                    self.hits += 1
                    return arr, meta
            except (OSError, ValueError) as e:
                log.warning("jaxpaged cache: packed weight %s unreadable (%s); repacking", key, e)
        self.misses += 1
        return None

    def put(self, key: str, array, meta: dict) -> None:
        """Stages one packed weight (written to a temp dir now; published by commit())."""
        if self._tmp is None:
            os.makedirs(self.root, exist_ok=True)
            self._tmp = tempfile.mkdtemp(prefix=f".tmp-{os.path.basename(self.final)}-", dir=self.root)
        arr = np.asarray(array)
        np.save(os.path.join(self._tmp, _file_name(key)), arr)
        self._new[key] = {**meta, "shape": list(arr.shape), "dtype": str(arr.dtype)}

    def commit(self) -> None:
        """Publishes the staged weights as this flavour (when nothing was missing, there is nothing to do)."""
        if self._tmp is None:
            return
        tmp, self._tmp = self._tmp, None
        try:
            if self._manifest:          # a partial hit: keep one complete set, the one already there
                return
            with open(os.path.join(tmp, "manifest.json"), "w") as f:
                json.dump(self._new, f)
            with open(os.path.join(tmp, "COMPLETE"), "w") as f:
                f.write("1\n")
            if os.path.isdir(self.final):
                if os.path.isfile(os.path.join(self.final, "COMPLETE")):
                    return              # another process published it first
                shutil.rmtree(self.final, ignore_errors=True)
            try:
                os.rename(tmp, self.final)
                tmp = None
            except OSError as e:        # a concurrent writer won the rename, or the disk refused
                log.warning("jaxpaged cache: packed weights not stored (%s)", e)
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
