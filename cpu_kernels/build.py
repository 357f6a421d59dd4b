"""Compiles the native CPU kernels once per machine and registers them with XLA as FFI targets.

The C++ sources are built with the system C++ compiler (`$CXX`, else `c++`/`g++`) against the
XLA FFI headers jaxlib ships (`jax.ffi.include_dir()`), for this CPU (`-march=native`), in groups
(GROUPS), one shared library each, into `<cache>/cpu_kernels/<hash>/`, the hash covering the group's
sources, the headers, the flags, jaxlib's version and the CPU model: a second start loads the library
without compiling. The write is atomic (build in a temp dir, rename), so concurrent first starts are
safe. A group's sources compile in parallel (one compiler process each). The "core" group (attention,
dense weight matmuls) is what every model runs: `build_in_background()` starts its build early (the
engine calls it before loading the model), so on a first start g++ overlaps the checkpoint conversion,
and `load()` waits for it. The quantized-weight, 8-bit KV attention and LoRA kernels build at their first use
(`load("quant")`, `load("lora")`), so a first start does not wait for code the model does not run.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import jax
import jaxlib

logger = logging.getLogger(__name__)



@dataclass(frozen=True)
class Group:
    """Kernel sources built into one shared library, and the FFI targets it registers."""
    sources: tuple[str, ...]                # file names beside this module
    targets: tuple[tuple[str, str], ...]    # (FFI target name, handler symbol)

    def paths(self) -> tuple[Path, ...]:
        return tuple(Path(__file__).with_name(n) for n in self.sources)


GROUPS = {
    # the attention is one unit per cache element type (ragged_paged_attention_kernels.h): they compile
    # in parallel; the 8-bit caches' target and units build with the quantized-weight kernels
    "core": Group(("ragged_paged_attention.cc", "ragged_paged_attention_f32.cc", "ragged_paged_attention_bf16.cc",
                   "matmul.cc"),
                  (("jaxpaged_ragged_paged_attention", "JaxpagedRaggedPagedAttention"),
                   ("jaxpaged_matmul", "JaxpagedMatmul"))),
    "quant": Group(("gguf_matmul.cc", "int8_matmul.cc", "ragged_paged_attention_8bit.cc",
                    "ragged_paged_attention_int8.cc", "ragged_paged_attention_e4m3.cc"),
                   (("jaxpaged_gguf_matmul", "JaxpagedGGUFMatmul"), ("jaxpaged_int8_matmul", "JaxpagedInt8Matmul"),
                    ("jaxpaged_ragged_paged_attention_8bit", "JaxpagedRaggedPagedAttention8Bit"))),
    "lora": Group(("lora_matmul.cc",), (("jaxpaged_lora_matmul", "JaxpagedLoRAMatmul"),)),
}
HEADERS = tuple(sorted(Path(__file__).parent.glob("*.h")))     # included by the sources: part of the build key
# -ffast-math lets GCC call glibc's vector exp/tanh (libmvec) in the softmax loops; the kernel never
# relies on NaN/inf arithmetic (masking uses a finite -1e30 and skips zero-probability V rows).
# Compile and link are separate steps: -ffast-math at link time adds crtfastmath.o, whose constructor
# turns on flush-to-zero for the whole process when the library loads (subnormals vanish in numpy,
# torch, everyone); LINK_FLAGS leave it out.
# -mprefer-vector-width=512: GCC otherwise keeps to 256-bit vectors on AVX-512 CPUs (a 64-wide head
# row is 4 zmm registers instead of 8 ymm); a no-op elsewhere.
FLAGS = ("-O3", "-march=native", "-mprefer-vector-width=512", "-ffast-math", "-fopenmp-simd", "-std=c++17",
         "-fPIC")
LINK_FLAGS = ("-shared", "-lmvec", "-lm")


_build_lock = threading.Lock()      # one build per process at a time (a background one, then load())


class NativeBuildError(RuntimeError):
    """The native kernels could not be compiled or loaded on this machine."""


def _compiler() -> str:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        path = shutil.which(name) if name else None
        if path:
            return path
    raise NativeBuildError("no C++ compiler found (set $CXX, or install g++)")


def compiler_available() -> bool:
    """Whether a C++ compiler is on this machine (cheap: nothing is built)."""
    try:
        _compiler()
        return True
    except NativeBuildError:
        return False


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cache_dir() -> Path:
    root = os.environ.get("JAXPAGED_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "jaxpaged")
    return Path(root) / "cpu_kernels"


def library_path(compiler: str, group: str = "core") -> Path:
    key = hashlib.sha256()
    for part in (*(src.read_bytes() for src in GROUPS[group].paths() + HEADERS), " ".join(FLAGS + LINK_FLAGS).encode(),
                 compiler.encode(), jaxlib.__version__.encode(), _cpu_model().encode()):
        key.update(part)
    return _cache_dir() / key.hexdigest()[:16] / f"libjaxpaged_{group}.so"


def _run(cmds: list[list[str]]) -> None:
    """Runs the commands at once (the compiles are independent); raises on the first failure."""
    for cmd in cmds:
        logger.info("building the native CPU kernels: %s", " ".join(cmd))
    procs = [(cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)) for cmd in cmds]
    failed = None
    for cmd, proc in procs:
        _, err = proc.communicate()
        if proc.returncode != 0 and failed is None:
            failed = (cmd, proc.returncode, err)
    if failed is not None:
        cmd, code, err = failed
        raise NativeBuildError(f"building the native CPU kernels failed ({cmd[0]} exit {code}):\n{err[-4000:]}")


def compile_shared(sources, out: Path, compiler: str | None = None) -> None:
    """Compiles `sources` (their headers beside them) with the kernels' flags into the shared library
    `out`, the objects beside it. Also used by `bench matmul --against` to build a past revision."""
    compiler = compiler or _compiler()
    objs = [out.parent / f"{Path(src).stem}.o" for src in sources]
    _run([[compiler, *FLAGS, f"-I{jax.ffi.include_dir()}", "-c", str(src), "-o", str(obj)]
          for src, obj in zip(sources, objs)])
    _run([[compiler, *map(str, objs), "-o", str(out), *LINK_FLAGS]])


def _compile(compiler: str, target: Path, sources) -> None:
    target.parent.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent.parent) as tmp:
        out = Path(tmp) / target.name
        compile_shared(sources, out, compiler)
        target.parent.mkdir(exist_ok=True)
        os.replace(out, target)          # atomic: a concurrent start sees no half-written file


def _ensure_built(compiler: str, path: Path, group: str = "core") -> None:
    with _build_lock:
        if not path.exists():
            if group != "core":
                logger.info("building the %s kernels (first use on this machine)", group)
            _compile(compiler, path, GROUPS[group].paths())


def build_in_background() -> threading.Thread | None:
    """Starts building the core kernels in a daemon thread when this machine has no build yet (returns
    it; None when there is nothing to build or no compiler). Errors are left for `load()` to raise."""
    try:
        compiler = _compiler()
        path = library_path(compiler)
    except (NativeBuildError, OSError):
        return None
    if path.exists():
        return None

    def build():
        try:
            _ensure_built(compiler, path)
        except Exception as e:          # load() retries in the foreground and reports it
            logger.debug("background build of the native CPU kernels failed: %s", e)

    thread = threading.Thread(target=build, name="jaxpaged-kernel-build", daemon=True)
    thread.start()
    return thread


def load(group: str = "core") -> ctypes.CDLL:
    """Builds (first time on this machine) and loads one group of kernels (GROUPS), registering its FFI
    targets, once per process and group (`load()` and `load("core")` are the same load).
    Raises NativeBuildError when that is not possible."""
    return _load_group(group)


@functools.cache
def _load_group(group: str) -> ctypes.CDLL:
    compiler = _compiler()
    path = library_path(compiler, group)
    _ensure_built(compiler, path, group)
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise NativeBuildError(f"loading {path} failed: {e}") from e
    for target, symbol in GROUPS[group].targets:
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    return lib


@functools.cache
def available() -> bool:
    """True when the native kernels built and loaded (logged once when they did not)."""
    try:
        load()
        return True
    except NativeBuildError as e:
        logger.warning("native CPU kernels unavailable, falling back to Pallas: %s", e)
        return False
