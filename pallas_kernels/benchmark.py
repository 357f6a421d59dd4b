"""Times ragged_paged_attention and kv_cache_write against their jnp references.

`run_kernel_benchmark()` returns one dict per (case, function) row; `python -m
pallas_kernels.benchmark` prints them as a table (`python -m jaxpaged.bench kernel`
calls the same function). Cases are decode-only, prefill-only and mixed batches
over a paged cache with permuted block tables. On CPU the kernels run in
interpret mode, so the numbers say how much the Pallas path costs there against
plain jnp; on a GPU they run as Triton kernels.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.kv_cache_write import kv_cache_write, kv_cache_write_reference
from pallas_kernels.ragged_paged_attention import (ragged_paged_attention,
                                                    ragged_paged_attention_reference)


@dataclasses.dataclass(frozen=True)
class Case:
    """One batch shape: q_lens[b] new tokens on top of ctx_lens[b] - q_lens[b] cached ones."""
    name: str
    q_lens: tuple[int, ...]
    ctx_lens: tuple[int, ...]


def default_cases(scale: int = 1) -> list[Case]:
    """Decode-only, prefill-only and mixed batches (sizes multiplied by `scale`)."""
    rng = np.random.default_rng(0)
    dec_ctx = tuple(int(x) for x in rng.integers(64, 1024 * scale, 64))
    return [
        Case("decode 64 seqs", (1,) * 64, dec_ctx),
        Case("prefill 4x256", (256,) * 4, (256 * scale,) * 2 + (512 * scale,) * 2),
        Case("mixed 2x256 + 62 decodes", (256, 256) + (1,) * 62, (256, 768 * scale) + dec_ctx[:62]),
    ]


def _make_inputs(case: Case, *, num_heads, num_kv_heads, head_dim, block_size, num_layers, dtype,
                 seed=0):
    """Random q, cache and permuted block tables for `case`; T padded up to a multiple of 64."""
    rng = np.random.default_rng(seed)
    b = len(case.q_lens)
    t = -(-sum(case.q_lens) // 64) * 64
    w = -(-max(case.ctx_lens) // block_size)
    num_blocks = 1 + sum(-(-c // block_size) for c in case.ctx_lens)
    perm = rng.permutation(np.arange(1, num_blocks))        # block 0 is the null block
    bt = np.zeros((b, w), np.int32)
    used = 0
    for i, c in enumerate(case.ctx_lens):
        n = -(-c // block_size)
        bt[i, :n] = perm[used:used + n]
        used += n
    cache_shape = (num_layers, num_kv_heads, num_blocks, block_size, head_dim)
    k = jnp.asarray(rng.standard_normal(cache_shape), dtype)
    v = jnp.asarray(rng.standard_normal(cache_shape), dtype)
    q = jnp.asarray(rng.standard_normal((t, num_heads, head_dim)), dtype)
    qs = np.concatenate([[0], np.cumsum(case.q_lens)]).astype(np.int32)
    # slots of the new tokens (the last q_len positions of each sequence); padding -> null block
    slots = np.zeros(t, np.int32)
    for i, (ql, c) in enumerate(zip(case.q_lens, case.ctx_lens)):
        pos = np.arange(c - ql, c)
        slots[qs[i]:qs[i + 1]] = bt[i, pos // block_size] * block_size + pos % block_size
    k_new = jnp.asarray(rng.standard_normal((t, num_kv_heads, head_dim)), dtype)
    return dict(q=q, k=k, v=v, bt=jnp.asarray(bt), lens=jnp.asarray(case.ctx_lens, jnp.int32),
                qs=jnp.asarray(qs), slots=jnp.asarray(slots), k_new=k_new, v_new=k_new * 0.5)


def _time(fn, args, repeats):
    """Median wall time in ms of fn(*args) after one compile/warm-up call."""
    out = jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times)), out


def _time_donated(fn, cache, args, repeats):
    """Like _time for fn(*cache, *args) -> cache with the cache donated: each call feeds the next."""
    cache = jax.block_until_ready(fn(*cache, *args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        cache = jax.block_until_ready(fn(*cache, *args))
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times)), cache


def run_kernel_benchmark(cases: list[Case] | None = None, *, num_heads=8, num_kv_heads=2, head_dim=64,
                         block_size=16, num_layers=2, dtype=jnp.float32, repeats=3,
                         interpret: bool | None = None, attention=None, label: str = "attention",
                         with_write: bool = True) -> list[dict]:
    """Kernel vs reference wall time for each case; returns a list of row dicts.

    Row keys: case, op ('attention' / 'kv_write'), tokens (T), seqs (B), context (sum of
    seq_lens), kernel_ms, reference_ms, ratio (kernel / reference), max_abs_err, backend.
    The cache is [L, KVH, NB, BS, D] and the kernels read/write it through `layer`.
    `attention`: another function with ragged_paged_attention's contract to time instead (its rows
    are labelled `label`); `with_write=False` skips the kv_write rows.
    """
    cases = cases or default_cases()
    dtype = jnp.dtype(dtype)
    sm_scale = head_dim ** -0.5
    layer = jnp.int32(num_layers - 1)
    rows = []
    kernel = attention or functools.partial(ragged_paged_attention, interpret=interpret)
    attend = jax.jit(lambda q, k, v, bt, sl, qs, layer: kernel(
        q, k, v, bt, sl, qs, sm_scale=sm_scale, layer=layer))
    attend_ref = jax.jit(lambda q, k, v, bt, sl, qs, layer: ragged_paged_attention_reference(
        q, k, v, bt, sl, qs, sm_scale=sm_scale, layer=layer))
    # the cache is donated, as in the engine's step: the write must then happen in place
    write = jax.jit(lambda k, v, kn, vn, s, layer: kv_cache_write(k, v, kn, vn, s, layer=layer,
                                                                  interpret=interpret),
                    donate_argnums=(0, 1))
    write_ref = jax.jit(lambda k, v, kn, vn, s, layer: kv_cache_write_reference(k, v, kn, vn, s,
                                                                                layer=layer),
                        donate_argnums=(0, 1))
    for case in cases:
        x = _make_inputs(case, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                         block_size=block_size, num_layers=num_layers, dtype=dtype)
        common = dict(case=case.name, tokens=int(x["q"].shape[0]), seqs=len(case.q_lens),
                      context=int(sum(case.ctx_lens)), backend=jax.default_backend())
        a_args = (x["q"], x["k"], x["v"], x["bt"], x["lens"], x["qs"], layer)
        k_ms, k_out = _time(attend, a_args, repeats)
        r_ms, r_out = _time(attend_ref, a_args, repeats)
        err = float(jnp.max(jnp.abs(k_out.astype(jnp.float32) - r_out.astype(jnp.float32))))
        rows.append(dict(common, op=label, kernel_ms=k_ms, reference_ms=r_ms,
                         ratio=k_ms / r_ms, max_abs_err=err))
        if not with_write:
            continue
        w_args = (x["k_new"], x["v_new"], x["slots"], layer)
        k_ms, k_out = _time_donated(write, (jnp.copy(x["k"]), jnp.copy(x["v"])), w_args, repeats)
        r_ms, r_out = _time_donated(write_ref, (jnp.copy(x["k"]), jnp.copy(x["v"])), w_args, repeats)
        err = max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
                  for a, b in zip(k_out, r_out))
        rows.append(dict(common, op="kv_write", kernel_ms=k_ms, reference_ms=r_ms,
                         ratio=k_ms / r_ms, max_abs_err=err))
    return rows


def run_decode_bandwidth(contexts=(1024, 2048, 4096, 8192, 16384, 32768), *, num_seqs=16, num_heads=32,
                         num_kv_heads=8, head_dim=128, block_size=16, dtype=jnp.bfloat16, repeats=10,
                         interpret: bool | None = None) -> list[dict]:
    """Decode attention's effective HBM bandwidth (K+V bytes read / time) per context length,
    next to the device's copy bandwidth (2 x bytes / time of copying a same-sized array).
    Meant for a GPU; rows: context, kernel_ms, kernel_gbps, copy_gbps, fraction."""
    dtype = jnp.dtype(dtype)
    rows = []
    attend = jax.jit(lambda q, k, v, bt, sl, qs: ragged_paged_attention(
        q, k, v, bt, sl, qs, sm_scale=head_dim ** -0.5, interpret=interpret))
    copy = jax.jit(lambda x: x + 1)              # reads and writes every byte once
    for ctx in contexts:
        case = Case(f"decode ctx {ctx}", (1,) * num_seqs, (ctx,) * num_seqs)
        x = _make_inputs(case, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                         block_size=block_size, num_layers=1, dtype=dtype)
        k, v = x["k"][0], x["v"][0]
        ms, _ = _time(attend, (x["q"], k, v, x["bt"], x["lens"], x["qs"]), repeats)
        kv_bytes = 2 * num_seqs * ctx * num_kv_heads * head_dim * dtype.itemsize
        copy_ms, _ = _time(copy, (k,), repeats)
        copy_gbps = 2 * k.size * dtype.itemsize / copy_ms / 1e6
        rows.append(dict(context=ctx, seqs=num_seqs, kernel_ms=ms, kernel_gbps=kv_bytes / ms / 1e6,
                         copy_gbps=copy_gbps, fraction=kv_bytes / ms / 1e6 / copy_gbps,
                         backend=jax.default_backend()))
    return rows


def format_table(rows: list[dict]) -> str:
    head = f"{'case':<26} {'op':<18} {'T':>5} {'B':>4} {'ctx':>7} {'kernel ms':>10} {'ref ms':>9} {'k/ref':>6} {'max err':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['case']:<26} {r['op']:<18} {r['tokens']:>5} {r['seqs']:>4} {r['context']:>7} "
                     f"{r['kernel_ms']:>10.2f} {r['reference_ms']:>9.2f} {r['ratio']:>6.2f} "
                     f"{r['max_abs_err']:>9.2e}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--scale", type=int, default=1, help="multiply context lengths")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--bandwidth", action="store_true",
                   help="decode bandwidth at contexts 1k..32k vs copy bandwidth (for a GPU)")
    a = p.parse_args(argv)
    if a.bandwidth:
        print(f"{'context':>8} {'seqs':>5} {'kernel ms':>10} {'GB/s':>8} {'copy GB/s':>10} {'fraction':>9}")
        for r in run_decode_bandwidth(dtype=a.dtype, block_size=a.block_size):
            print(f"{r['context']:>8} {r['seqs']:>5} {r['kernel_ms']:>10.3f} {r['kernel_gbps']:>8.1f} "
                  f"{r['copy_gbps']:>10.1f} {r['fraction']:>9.2f}")
        return
    rows = run_kernel_benchmark(default_cases(a.scale), num_heads=a.heads, num_kv_heads=a.kv_heads,
                                head_dim=a.head_dim, block_size=a.block_size, dtype=a.dtype,
                                repeats=a.repeats)
    print(f"backend={jax.default_backend()} dtype={a.dtype} NH={a.heads} KVH={a.kv_heads} "
          f"D={a.head_dim} BS={a.block_size}")
    print(format_table(rows))


if __name__ == "__main__":
    main()
