"""The packed weight matmul as it was at a git revision, beside today's, in one process.

`bench matmul --against REV` builds `cpu_kernels/matmul.cc` (and the headers it includes) from REV
into its own library, registers its handler as an FFI target of its own name, and times both kernels
on the same stacked, layer-indexed weights, alternating call by call. Timings on a shared 2-core VM
drift by +-10-20% within minutes; two processes run minutes apart cannot tell a 5% change from that
drift, while alternating calls in one process see the same machine.

Both libraries are loaded with RTLD_LOCAL (ctypes' default on Linux), so their identical symbol
names do not clash; each handler is looked up in its own library.
"""
from __future__ import annotations

import ctypes
import functools
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

SOURCE = "cpu_kernels/matmul.cc"
HANDLER = "JaxpagedMatmul"
_libraries: list[ctypes.CDLL] = []      # the libraries built here stay loaded: XLA holds their handlers


def _git(repo: Path, *args: str) -> bytes:
    try:
        return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        err = getattr(e, "stderr", b"") or b""
        raise ValueError(f"--against: git {' '.join(args)} failed in {repo}: "
                         f"{err.decode(errors='replace').strip() or e}") from None


def default_repo() -> Path:
    """The checkout this package runs from (cpu_kernels/ sits at its root)."""
    from cpu_kernels import build
    return Path(build.__file__).resolve().parent.parent


@functools.cache
def target_at(rev: str, repo: Path | None = None) -> str:
    """Builds matmul.cc at `rev` of `repo` (default: this package's checkout) and registers it;
    returns the FFI target name. Raises ValueError when there is no such revision or checkout."""
    import jax

    from cpu_kernels import build
    repo = Path(repo) if repo is not None else default_repo()
    commit = _git(repo, "rev-parse", "--verify", f"{rev}^{{commit}}").decode().strip()
    tmp = Path(tempfile.mkdtemp(prefix=f"jaxpaged-matmul-{commit[:10]}-"))
    headers = [p for p in _git(repo, "ls-tree", "--name-only", commit, "cpu_kernels/").decode().split()
               if p.endswith(".h")]
    for path in (SOURCE, *headers):
        (tmp / Path(path).name).write_bytes(_git(repo, "show", f"{commit}:{path}"))
    lib = tmp / "libmatmul_at_rev.so"
    build.compile_shared([tmp / Path(SOURCE).name], lib)
    handle = ctypes.CDLL(str(lib))                  # RTLD_LOCAL: its symbols stay its own
    name = f"jaxpaged_matmul_at_{commit[:10]}"
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(handle, HANDLER)), platform="cpu")
    _libraries.append(handle)
    return name


def _layer_scan(target: str, m: int, n: int, layers: int):
    """jit fn(x [M, K], packed [L, ...]) running the target on every layer in a scan (the model's
    access pattern: each call's weights are cold), returning a scalar so nothing big is copied."""
    import jax
    import jax.numpy as jnp

    @jax.jit
    def run(x, data):
        def body(acc, layer):
            call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((m, n), jnp.float32))
            y = call(x, data, layer.reshape(1), jnp.full((1,), m, jnp.int32))
            return acc + y[0, 0], None
        return jax.lax.scan(body, jnp.float32(0), jnp.arange(layers, dtype=jnp.int32))[0]
    return run


def compare(rev: str, shapes, rows, dtypes, layers: int, repeats: int, repo: Path | None = None) -> None:
    """Prints a table: ms per layer call at `rev` and now, best of `repeats` alternating rounds."""
    import jax
    import jax.numpy as jnp

    from cpu_kernels.matmul import TARGET, load, pack
    load()
    old = target_at(rev, repo)
    rng = np.random.default_rng(0)
    print(f"\nlayer-stacked A/B ({layers} layers, the weights cold each call): {rev} vs this tree, "
          f"alternating, best of {repeats}")
    print(f"| dtype | K x N | M | {rev} ms | now ms | now / {rev} |")
    print("|---|---|---|---|---|---|")
    for dtype in dtypes:
        for k, n in shapes:
            w = jnp.asarray(rng.standard_normal((layers, k, n)), jnp.float32).astype(dtype)
            packed = pack(w, stacked=True)
            del w
            for m in rows:
                x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32).astype(dtype)
                if packed.data.dtype == jnp.uint16:
                    x = jax.lax.bitcast_convert_type(x.astype(jnp.bfloat16), jnp.uint16)
                fns = (_layer_scan(old, m, n, layers), _layer_scan(TARGET, m, n, layers))
                sums = [float(f(x, packed.data)) for f in fns]          # compile, warm, and agree
                if not np.isclose(sums[0], sums[1], rtol=1e-3, atol=1e-3 * max(1.0, abs(sums[0]))):
                    raise RuntimeError(f"{dtype} {k}x{n} M={m}: the kernels disagree ({sums})")
                best = [float("inf")] * 2
                for _ in range(repeats):
                    for i, f in enumerate(fns):
                        start = time.perf_counter()
                        f(x, packed.data).block_until_ready()
                        best[i] = min(best[i], (time.perf_counter() - start) / layers)
                print(f"| {dtype} | {k}x{n} | {m} | {best[0] * 1e3:.4f} | {best[1] * 1e3:.4f} | "
                      f"{best[1] / best[0]:.3f} |", flush=True)
