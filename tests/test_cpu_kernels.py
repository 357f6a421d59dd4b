"""The native CPU attention (cpu_kernels, C++ via XLA FFI) against the jnp reference: what only it
has (bf16 bit-pattern caches, the build cache, threads). The batch-shape tests it shares with the
Pallas kernel are parametrized over both in test_kernels.py."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from cpu_kernels import ragged_paged_attention_cpu
from cpu_kernels.build import FLAGS, _compiler, _load_group, library_path, load
from tests.test_kernels import attend, check_against_reference, make_batch


def check(x, **kw):
    return check_against_reference(x, ragged_paged_attention_cpu, **kw)


def test_builds_once_and_registers():
    load()
    path = library_path(_compiler())
    assert path.exists() and "-march=native" in FLAGS
    mtime = path.stat().st_mtime_ns
    _load_group.cache_clear()
    load()                                     # a second start loads the built library
    assert path.stat().st_mtime_ns == mtime


def test_bf16_cache_with_f32_queries_matches_f32():
    # the engine may keep a bf16 cache: the kernel reads bf16 pages, computes in f32
    x = make_batch([1, 9, 1], [40, 60, 17], num_heads=4, num_kv_heads=2, head_dim=64, block_size=8)
    kb, vb = x["k"].astype(jnp.bfloat16), x["v"].astype(jnp.bfloat16)
    xb = dict(x, q=x["q"].astype(jnp.bfloat16), k=kb, v=vb)
    xr = dict(x, k=kb.astype(jnp.float32), v=vb.astype(jnp.float32))
    out = np.asarray(attend(xb, ragged_paged_attention_cpu), np.float32)
    ref = np.asarray(attend(dict(xr, q=xb["q"].astype(jnp.float32)), ragged_paged_attention_cpu))
    np.testing.assert_allclose(out, ref, atol=1e-2, rtol=0)


@pytest.mark.parametrize("seed", range(6))
def test_random_batches(seed):
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(1, 40))
    seq_lens = [int(s) for s in rng.integers(1, 300, n)]
    q_lens = [int(rng.integers(1, s + 1)) if rng.random() < 0.3 else 1 for s in seq_lens]
    bs = int(rng.choice([8, 16, 32]))
    kvh = int(rng.choice([1, 2, 3]))
    x = make_batch(q_lens, seq_lens, num_heads=kvh * int(rng.choice([1, 2, 3, 4])), num_kv_heads=kvh,
                   head_dim=64, block_size=bs, pad_seqs=int(rng.integers(0, 3)), seed=seed)
    out = check(x)
    again = attend(x, ragged_paged_attention_cpu)          # threads race for work items: same answer
    np.testing.assert_array_equal(np.asarray(out), np.asarray(again))


# Prefill items hold up to 64 (token, query head) rows of one KV head in SIMD lanes (16 per vector under
# AVX-512, 8 under AVX, 4 otherwise). Cases: items of 9..64 rows (1..4 vectors, the last one partial),
# tiles that split a token's query heads (64 is no multiple of G = 3, 5), head dims that are no multiple
# of the vector width (scalar tails in the transposes, 1-wide P.V blocks), window + soft cap.
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(9, 3, 64), (5, 1, 36), (4, 4, 70), (12, 2, 24)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_prefill_tiles(num_heads, num_kv_heads, head_dim, dtype):
    q_lens = [3, 5, 11, 16, 22, 40, 77, 1]
    seq_lens = [3, 60, 11, 50, 90, 40, 130, 33]
    x = make_batch(q_lens, seq_lens, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                   block_size=16, dtype=dtype)
    check(x)
    if dtype == jnp.float32:
        check(make_batch(q_lens, seq_lens, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                         block_size=8, window=25), soft_cap=4.0, sliding_window=25)


def test_prefill_ignores_nan_past_the_sequence_end():
    # the last page's slots past seq_len may hold anything (stale or never written): no NaN may leak
    x = make_batch([30, 45], [37, 45], num_heads=6, num_kv_heads=2, head_dim=64, block_size=16, seed=3)
    bt = np.asarray(x["block_tables"])
    k, v = np.array(x["k"]), np.array(x["v"])
    for i, s in enumerate([37, 45]):
        k[:, bt[i, s // 16], s % 16:] = np.nan
        v[:, bt[i, s // 16], s % 16:] = np.nan
    check(dict(x, k=jnp.asarray(k), v=jnp.asarray(v)))


# Decode items (<= 8 rows of one KV head) with head dim 64, 128 or 256 take the vector path: 16 keys'
# scores per reduction, bf16 read in even/odd order, a running max that moves only when a page's
# maximum jumps past it by a margin. Cases: 1..8 rows (G = 1, 2, 3, 8; 2-5 tokens of G = 1, 2),
# keys whose scale grows along the sequence (the max moves again and again), pages past the end NaN.
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(9, 3, 64), (8, 1, 128), (4, 2, 256), (2, 2, 64)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_decode_items(num_heads, num_kv_heads, head_dim, dtype):
    group = num_heads // num_kv_heads
    q_lens = [1, 1, 1, 2, 1, 8 // group or 1, 1]
    seq_lens = [1, 16, 17, 40, 100, 70, 300]
    x = make_batch(q_lens, seq_lens, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                   block_size=16, dtype=dtype, seed=5)
    k, v = np.array(x["k"], np.float32), np.array(x["v"], np.float32)
    k *= np.linspace(0.5, 6.0, k.shape[-2])[:, None]          # scores grow within each page...
    bt = np.asarray(x["block_tables"])
    for i, s in enumerate(seq_lens):                            # ... and page by page along a sequence
        for pg in range(-(-s // 16)):
            k[:, bt[i, pg]] *= 1 + pg / 2
        if s % 16:
            k[:, bt[i, s // 16], s % 16:] = np.nan                # past the end: never read
            v[:, bt[i, s // 16], s % 16:] = np.nan
    x = dict(x, k=jnp.asarray(k, dtype), v=jnp.asarray(v, dtype))
    # the keys are scaled up to ~60x here, so are the scores: f32 rounding of a score grows with it, and
    # the kernel sums a dot product in another order than XLA (8 or 16 lanes): 1e-5 held on AVX-512 but
    # an AVX2 CPU's order differed from the reference by 2.2e-5 at head_dim 256 (measured)
    atol = 5e-5 if dtype == jnp.float32 else None
    check(x, atol=atol)
    check(x, atol=atol, soft_cap=5.0, sliding_window=33)


def test_layer_form_under_scan_reads_only_its_layer():
    num_layers = 3
    x = make_batch([5, 1, 1], [37, 20, 64], num_heads=4, num_kv_heads=2, head_dim=64, block_size=16,
                   num_layers=num_layers)
    x = dict(x, k=x["k"].at[0].set(jnp.nan), v=x["v"].at[0].set(jnp.nan))    # layer 0 never read below
    qs = jnp.stack([x["q"] * (i + 1) for i in range(num_layers)])

    def step(_, xs):
        q, layer = xs
        return None, ragged_paged_attention_cpu(q, x["k"], x["v"], x["block_tables"], x["seq_lens"],
                                                x["query_start"], sm_scale=0.125, layer=layer)

    layers = jnp.arange(1, num_layers, dtype=jnp.int32)
    _, outs = jax.jit(lambda q: jax.lax.scan(step, None, (q, layers)))(qs[1:])
    for j, i in enumerate(range(1, num_layers)):
        per_layer = dict(x, q=qs[i], k=x["k"][i], v=x["v"][i])
        ref = check(per_layer, sm_scale=0.125)
        np.testing.assert_allclose(np.asarray(outs[j]), np.asarray(ref), atol=1e-6, rtol=0)


def test_bad_input_raises_value_error():
    q = jnp.zeros((8, 4, 64), jnp.float16)
    k = jnp.zeros((2, 10, 8, 64), jnp.float16)
    args = (q, k, k, jnp.zeros((3, 4), jnp.int32), jnp.zeros((3,), jnp.int32), jnp.zeros((4,), jnp.int32))
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        ragged_paged_attention_cpu(*args, sm_scale=0.125)
    with pytest.raises(ValueError, match=r"query_start must be \[4\]"):
        ragged_paged_attention_cpu(*args[:5], jnp.zeros((3,), jnp.int32), sm_scale=0.125)


def test_loading_keeps_subnormals_for_the_process():
    # -ffast-math can link crtfastmath.o, which sets flush-to-zero process-wide on load
    load()
    tiny = np.float32(1e-39)
    assert tiny * np.float32(0.5) != 0


def test_background_build_then_load_builds_once(tmp_path, monkeypatch):
    """The engine starts the build early (build_in_background); load() then waits for it, never builds twice."""
    import threading
    import time

    import cpu_kernels.build as build
    compiled = []
    release = threading.Event()

    def slow_compile(compiler, target, sources):
        release.wait(10)
        compiled.append(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"built")

    monkeypatch.setenv("JAXPAGED_CACHE", str(tmp_path))
    monkeypatch.setattr(build, "_compile", slow_compile)
    compiler = _compiler()
    path = library_path(compiler)
    thread = build.build_in_background()
    assert thread is not None and path.parent.parent == tmp_path / "cpu_kernels"
    waiter = threading.Thread(target=build._ensure_built, args=(compiler, path))
    waiter.start()
    time.sleep(0.2)
    assert waiter.is_alive()                    # the foreground waits for the build in flight
    release.set()
    thread.join(10)
    waiter.join(10)
    assert compiled == [path] and path.read_bytes() == b"built"
    assert build.build_in_background() is None  # built: nothing to start


def test_failing_compiler_names_the_error(tmp_path, monkeypatch):
    import cpu_kernels.build as build
    fake = tmp_path / "fakecxx"
    fake.write_text("#!/bin/sh\necho 'fatal: no luck' >&2\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setenv("JAXPAGED_CACHE", str(tmp_path))
    with pytest.raises(build.NativeBuildError, match="exit 3.*\n.*no luck"):
        build._compile(str(fake), library_path(str(fake)), build.GROUPS["core"].paths())
    assert not library_path(str(fake)).exists()


def test_kernel_groups_build_apart_and_start_with_the_core(tmp_path, monkeypatch):
    """A first start builds only the core group (attention, dense matmuls) in the background; the
    quantized-weight and LoRA kernels are their own libraries, built at their first load."""
    import cpu_kernels.build as build
    built = []

    def fake_compile(compiler, target, sources):
        built.append(sorted(p.name for p in sources))
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"built")

    monkeypatch.setenv("JAXPAGED_CACHE", str(tmp_path))
    monkeypatch.setattr(build, "_compile", fake_compile)
    compiler = _compiler()
    thread = build.build_in_background()
    thread.join(10)
    assert built == [sorted(["matmul.cc", "ragged_paged_attention.cc", "ragged_paged_attention_f32.cc",
                             "ragged_paged_attention_bf16.cc"])]
    paths = {g: library_path(compiler, g) for g in build.GROUPS}
    assert len(set(paths.values())) == 3 and paths["core"].exists() and not paths["quant"].exists()
    build._ensure_built(compiler, paths["quant"], "quant")
    assert built[-1] == sorted(["gguf_matmul.cc", "int8_matmul.cc", "ragged_paged_attention_8bit.cc",
                                "ragged_paged_attention_e4m3.cc", "ragged_paged_attention_int8.cc"])
    assert paths["quant"].exists()
    # every .cc beside build.py is in exactly one group, and every group's targets are distinct
    sources = [n for g in build.GROUPS.values() for n in g.sources]
    assert sorted(sources) == sorted(p.name for p in Path(build.__file__).parent.glob("*.cc"))
    targets = [t for g in build.GROUPS.values() for t, _ in g.targets]
    assert len(targets) == len(set(targets)) == 6
