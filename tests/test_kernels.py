"""Pallas kernels (interpret mode) against their jnp references on random paged caches.

The batch-shape tests also run the native CPU attention (cpu_kernels), which has the same contract;
its own extras (bf16 bit-pattern caches, build cache, threads) are in test_cpu_kernels.py."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from cpu_kernels import ragged_paged_attention_cpu
from pallas_kernels import (Tiling, kv_cache_write, kv_cache_write_reference, ragged_paged_attention,
                            ragged_paged_attention_reference)
from pallas_kernels.attention_triton import choose_kv_splits, gpu_tiling, num_prefill_blocks

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}
_STATIC = ("sm_scale", "soft_cap", "sliding_window", "interpret", "max_query_len")
attention_reference = jax.jit(ragged_paged_attention_reference, static_argnames=_STATIC)
# the attention kernels with ragged_paged_attention's contract
KERNELS = [pytest.param(ragged_paged_attention, id="pallas"), pytest.param(ragged_paged_attention_cpu, id="native")]


def make_batch(q_lens, seq_lens, *, num_heads, num_kv_heads, head_dim, block_size, dtype=jnp.float32,
               width=None, pad_tokens=3, pad_seqs=1, num_layers=None, window=None, seed=0):
    """Random ragged batch over a paged cache with permuted, non-contiguous block tables.

    Every page the kernel must not read is NaN: the null block 0, spare pages, pages wholly
    before a sequence's sliding window, and the table entries past a sequence's last page
    (which point at spare NaN pages, not at block 0). Padding sequences (seq_len 0, q_len 0)
    and padding tokens are appended.
    """
    rng = np.random.default_rng(seed)
    q_lens = list(q_lens) + [0] * pad_seqs
    seq_lens = list(seq_lens) + [0] * pad_seqs
    b, bs = len(q_lens), block_size
    pages = [-(-s // bs) for s in seq_lens]
    width = width or max(pages + [1])
    spare = 4
    num_blocks = 1 + sum(pages) + spare
    perm = rng.permutation(np.arange(1, num_blocks))       # shuffled: tables are non-contiguous
    spare_ids = perm[sum(pages):]
    bt = np.zeros((b, width), np.int32)
    lead = (num_layers,) if num_layers else ()
    shape = lead + (num_kv_heads, num_blocks, bs, head_dim)
    k = rng.standard_normal(shape).astype(np.float32)
    v = rng.standard_normal(shape).astype(np.float32)
    nan_pages = [0, *spare_ids]
    used = 0
    for i, (ql, s) in enumerate(zip(q_lens, seq_lens)):
        n = pages[i]
        bt[i, :n] = perm[used:used + n]
        bt[i, n:] = rng.choice(spare_ids, width - n)      # garbage past the last page
        used += n
        if window is not None and s:
            first_seen = max(0, s - ql - window + 1)          # earliest position any query can see
            nan_pages += list(bt[i, :first_seen // bs])
    k[..., nan_pages, :, :] = np.nan
    v[..., nan_pages, :, :] = np.nan
    t = sum(q_lens) + pad_tokens
    q = rng.standard_normal((t, num_heads, head_dim)).astype(np.float32)
    qs = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    return dict(q=jnp.asarray(q, dtype), k=jnp.asarray(k, dtype), v=jnp.asarray(v, dtype),
                block_tables=jnp.asarray(bt), seq_lens=jnp.asarray(seq_lens, jnp.int32),
                query_start=jnp.asarray(qs))


def attend(x, fn=ragged_paged_attention, **kw):
    kw.setdefault("sm_scale", x["q"].shape[-1] ** -0.5)
    return fn(x["q"], x["k"], x["v"], x["block_tables"], x["seq_lens"], x["query_start"], **kw)


def check_against_reference(x, fn=ragged_paged_attention, atol=None, **kw):
    """atol: the absolute tolerance (default TOL of q's dtype)."""
    out = attend(x, fn, **kw)
    kw.pop("tiling", None)
    kw.pop("gpu_kernel", None)
    ref = attend(x, attention_reference, **kw)
    out32, ref32 = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert out.dtype == x["q"].dtype and out.shape == x["q"].shape
    assert np.isfinite(out32).all(), "kernel output has NaN/inf (read a page it must not)"
    assert np.isfinite(ref32).all()
    n = int(x["query_start"][-1])
    np.testing.assert_allclose(out32, ref32, atol=atol or TOL[x["q"].dtype.type], rtol=0)
    assert (out32[n:] == 0).all(), "padding rows must come back as 0"
    return out


def boundary_lengths(bs, width):
    return [1, bs - 1, bs, bs + 1, width * bs]


# GQA ratio 1, 3, 8, 9 (SmolLM2's 3 KV heads x 3); head_dim 64, 128 and a non-power-of-two 80;
# block sizes 8, 16, 32
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("block_size,num_heads,num_kv_heads,head_dim",
                         [(8, 2, 2, 64), (16, 6, 2, 128), (32, 8, 1, 64), (16, 9, 3, 64), (8, 4, 2, 80)])
def test_page_boundaries_decode_and_prefill(kernel, block_size, num_heads, num_kv_heads, head_dim):
    width = 4
    lens = boundary_lengths(block_size, width)
    # each length once as a decode (q_len 1) and once as a whole-prompt prefill (q_len = len)
    x = make_batch([1] * len(lens) + lens, lens + lens, num_heads=num_heads,
                   num_kv_heads=num_kv_heads, head_dim=head_dim, block_size=block_size, width=width)
    check_against_reference(x, kernel)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_mixed_batch_prefill_chunks_and_decodes(kernel, dtype):
    rng = np.random.default_rng(1)
    dec_lens = [int(n) for n in rng.integers(1, 200, 20)]
    # chunked prefills: a first chunk (q_len = seq_len), later chunks on top of cached tokens;
    # chunks of 15, 16, 17 tokens cross the native kernel's 16-token query tiles
    q_lens = [70, 33, 100, 5, 15, 16, 17] + [1] * len(dec_lens)
    seq_lens = [70, 150, 130, 40, 15, 48, 80] + dec_lens
    x = make_batch(q_lens, seq_lens, num_heads=6, num_kv_heads=2, head_dim=64, block_size=16,
                   dtype=dtype, pad_seqs=3, pad_tokens=9)
    check_against_reference(x, kernel)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("soft_cap,window", [(8.0, None), (None, 20), (5.0, 33), (None, 1)])
def test_soft_cap_and_sliding_window(kernel, soft_cap, window):
    q_lens, seq_lens = [1, 1, 40, 17, 1], [90, 16, 40, 100, 33]
    x = make_batch(q_lens, seq_lens, num_heads=4, num_kv_heads=2, head_dim=64, block_size=8,
                   window=window)
    check_against_reference(x, kernel, soft_cap=soft_cap, sliding_window=window)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("q_lens,seq_lens,pad_tokens,pad_seqs", [
    ([1], [1], 0, 0),          # one decode token, nothing padded
    ([0, 0], [0, 0], 4, 0),    # an all-padding batch: every row comes back 0
])
def test_edge_batches(kernel, q_lens, seq_lens, pad_tokens, pad_seqs):
    x = make_batch(q_lens, seq_lens, num_heads=4, num_kv_heads=1, head_dim=64, block_size=16,
                   pad_tokens=pad_tokens, pad_seqs=pad_seqs)
    check_against_reference(x, kernel)


# The GPU kernel (attention_triton: split-KV decode programs + prefill query blocks in one launch)
# runs in interpret mode too, so its index arithmetic is checked here: segments of unequal length
# and empty ones, decodes of 1..TD tokens, prefill blocks overrunning into the next sequence,
# head_dim padded to a power of two (80 -> 128), a page size that is no power of two (24, 8).
@pytest.mark.parametrize("head_dim,block_size,splits,opts", [
    (64, 8, 3, {}),
    (80, 24, 4, dict(sliding_window=45, soft_cap=10.0)),
])
def test_gpu_kernel_in_interpret_mode(head_dim, block_size, splits, opts):
    q_lens, seq_lens = [1, 37, 1, 4, 9, 130, 2], [50, 37, 8, 100, 100, 200, 300]
    x = make_batch(q_lens, seq_lens, num_heads=6, num_kv_heads=2, head_dim=head_dim, block_size=block_size,
                   window=opts.get("sliding_window"))
    t = dataclasses.replace(gpu_tiling(6, 2, head_dim, 8, 320), kv_splits=splits)
    assert (t.group, t.head_dim, t.decode_tokens, t.q_block) == (4, 128 if head_dim == 80 else 64, 4, 16)
    check_against_reference(x, tiling=t, interpret=True, **opts)


def test_gpu_kernel_decode_only_bound_and_bf16():
    """max_query_len <= TD launches no prefill programs; decodes alone still match (bf16 cache)."""
    x = make_batch([1, 1, 2, 1], [1, 64, 129, 17], num_heads=8, num_kv_heads=1, head_dim=64, block_size=16,
                   dtype=jnp.bfloat16)
    t = dataclasses.replace(gpu_tiling(8, 1, 64, 5, 144), kv_splits=2)
    assert num_prefill_blocks(x["q"].shape[0], 5, t, max_query_len=2) == 0
    check_against_reference(x, tiling=t, interpret=True, max_query_len=2)


@pytest.mark.parametrize("batch,kvh,context,want", [
    (1, 8, 32768, 64), (8, 8, 8192, 8), (64, 8, 8192, 1), (1, 3, 1024, 4), (1, 1, 64, 1)])
def test_kv_splits_fill_the_gpu(batch, kvh, context, want):
    """~2 programs per SM (132) when the context allows >= 4 chunks of 64 per segment."""
    assert choose_kv_splits(batch, kvh, context, 64) == want


def test_layer_form_matches_per_layer_and_runs_under_scan():
    num_layers = 3
    x = make_batch([5, 1, 1], [37, 20, 64], num_heads=4, num_kv_heads=2, head_dim=64, block_size=16,
                   num_layers=num_layers)
    x = dict(x, q=jnp.stack([x["q"] * (i + 1) for i in range(num_layers)]))   # a different q per layer

    def step(_, xs):
        q, layer = xs
        out = ragged_paged_attention(q, x["k"], x["v"], x["block_tables"], x["seq_lens"],
                                     x["query_start"], sm_scale=0.125, layer=layer)
        return None, out

    _, outs = jax.jit(lambda q: jax.lax.scan(step, None, (q, jnp.arange(num_layers, dtype=jnp.int32))))(x["q"])
    for i in range(num_layers):
        per_layer = dict(x, q=x["q"][i], k=x["k"][i], v=x["v"][i])
        ref = check_against_reference(per_layer, sm_scale=0.125)
        np.testing.assert_allclose(np.asarray(outs[i]), np.asarray(ref), atol=1e-6, rtol=0)


def test_reference_reads_only_its_layer():
    x = make_batch([3, 1], [19, 7], num_heads=2, num_kv_heads=1, head_dim=64, block_size=8, num_layers=2)
    poisoned = dict(x, k=x["k"].at[0].set(jnp.nan), v=x["v"].at[0].set(jnp.nan))
    layer = jnp.int32(1)
    a = attend(poisoned, layer=layer)
    b = attend(poisoned, attention_reference, layer=layer)
    assert np.isfinite(np.asarray(a)).all() and np.isfinite(np.asarray(b)).all()
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- kv_cache_write


def make_write(num_tokens, num_pad, *, num_kv_heads=2, head_dim=64, block_size=8, num_blocks=12,
               num_layers=None, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    lead = (num_layers,) if num_layers else ()
    shape = lead + (num_kv_heads, num_blocks, block_size, head_dim)
    k = jnp.asarray(rng.standard_normal(shape), dtype)
    v = jnp.asarray(rng.standard_normal(shape), dtype)
    # distinct real slots outside the null block, then padding slots inside block 0
    real = rng.permutation(np.arange(block_size, num_blocks * block_size))[:num_tokens]
    pad = rng.integers(0, block_size, num_pad)
    slots = jnp.asarray(np.concatenate([real, pad]), jnp.int32)
    t = num_tokens + num_pad
    k_new = jnp.asarray(rng.standard_normal((t, num_kv_heads, head_dim)), dtype)
    v_new = jnp.asarray(rng.standard_normal((t, num_kv_heads, head_dim)), dtype)
    return k, v, k_new, v_new, slots


def _without_null_block(x):
    return np.asarray(x[..., 1:, :, :], np.float32)


# tile None: the interpret tiling (one scatter); (16, 1) / (4, 1): the GPU tiling, whose last
# tile overruns T and is masked (head_dim 80: columns padded to 128, the padding never stored)
@pytest.mark.parametrize("num_layers,tile,dtype,head_dim", [
    (None, None, jnp.float32, 64), (3, None, jnp.bfloat16, 64), (3, (16, 1), jnp.float32, 80),
    (None, (4, 1), jnp.bfloat16, 64)])
def test_kv_cache_write_matches_reference(num_layers, tile, dtype, head_dim):
    k, v, k_new, v_new, slots = make_write(21, 6, num_layers=num_layers, dtype=dtype, head_dim=head_dim)
    layer = None if num_layers is None else jnp.int32(1)
    out = kv_cache_write(k, v, k_new, v_new, slots, layer=layer, tile=tile)
    ref = kv_cache_write_reference(k, v, k_new, v_new, slots, layer=layer)
    for a, r, before in zip(out, ref, (k, v)):
        assert a.shape == before.shape and a.dtype == before.dtype
        np.testing.assert_array_equal(_without_null_block(a), _without_null_block(r))
    # the real tokens landed where their slots say (and other layers are untouched)
    bs = k.shape[-2]
    got = out[0] if num_layers is None else out[0][1]
    s = np.asarray(slots[:21])
    np.testing.assert_array_equal(np.asarray(got[:, s // bs, s % bs, :]).swapaxes(0, 1),
                                  np.asarray(k_new[:21]))
    if num_layers is not None:
        np.testing.assert_array_equal(np.asarray(out[0][0]), np.asarray(k[0]))
        np.testing.assert_array_equal(np.asarray(out[0][2]), np.asarray(k[2]))


def test_kv_cache_write_then_attend_under_donation():
    """The engine's pattern: write this step's K/V in place (donated), then attend over it."""
    x = make_batch([4, 1], [12, 9], num_heads=4, num_kv_heads=2, head_dim=64, block_size=8,
                   num_layers=2)
    bt = np.asarray(x["block_tables"])
    slots = [bt[0, p // 8] * 8 + p % 8 for p in range(8, 12)] + [bt[1, 1] * 8 + 0] + [0, 0, 0]
    rng = np.random.default_rng(3)
    k_new = jnp.asarray(rng.standard_normal((8, 2, 64)), jnp.float32)

    @jax.jit
    def step(k, v, layer):
        k, v = kv_cache_write(k, v, k_new, k_new, jnp.asarray(slots, jnp.int32), layer=layer)
        return k, v, ragged_paged_attention(x["q"], k, v, x["block_tables"], x["seq_lens"],
                                            x["query_start"], sm_scale=0.125, layer=layer)

    step_donated = jax.jit(step, donate_argnums=(0, 1))
    k2, v2, out = step_donated(jnp.copy(x["k"]), jnp.copy(x["v"]), jnp.int32(1))
    kr, vr = kv_cache_write_reference(x["k"], x["v"], k_new, k_new, jnp.asarray(slots, jnp.int32),
                                      layer=jnp.int32(1))
    np.testing.assert_array_equal(_without_null_block(k2), _without_null_block(kr))
    ref = attention_reference(x["q"], kr, vr, x["block_tables"], x["seq_lens"],
                                           x["query_start"], sm_scale=0.125, layer=jnp.int32(1))
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- bad input


def _good_attention_args():
    q = jnp.zeros((8, 4, 64), jnp.float32)
    k = jnp.zeros((2, 10, 8, 64), jnp.float32)
    return dict(q=q, k_pages=k, v_pages=k, block_tables=jnp.zeros((3, 4), jnp.int32),
                seq_lens=jnp.zeros((3,), jnp.int32), query_start=jnp.zeros((4,), jnp.int32))


@pytest.mark.parametrize("fn", [ragged_paged_attention, ragged_paged_attention_reference])
@pytest.mark.parametrize("change,match", [
    (dict(q=jnp.zeros((8, 4, 32), jnp.float32)), "head_dim"),
    (dict(q=jnp.zeros((8, 3, 64), jnp.float32)), "multiple of KV heads"),
    (dict(q=jnp.zeros((8, 4, 64), jnp.bfloat16)), "dtype"),
    (dict(q=jnp.zeros((8, 256), jnp.float32)), r"\[T, NH, D\]"),
    (dict(v_pages=jnp.zeros((2, 10, 16, 64), jnp.float32)), "same shape"),
    (dict(block_tables=jnp.zeros((3, 4), jnp.float32)), "int32"),
    (dict(seq_lens=jnp.zeros((2,), jnp.int32)), r"seq_lens must be \[3\]"),
    (dict(query_start=jnp.zeros((3,), jnp.int32)), r"query_start must be \[4\]"),
    (dict(k_pages=jnp.zeros((1, 2, 10, 8, 64), jnp.float32),
          v_pages=jnp.zeros((1, 2, 10, 8, 64), jnp.float32)), "needs `layer`"),
])
def test_attention_bad_input_raises_value_error_with_shapes(fn, change, match):
    args = dict(_good_attention_args(), **change)
    with pytest.raises(ValueError, match=match) as e:
        fn(**args, sm_scale=0.125)
    assert str(args["q"].shape) in str(e.value) and str(args["k_pages"].shape) in str(e.value)


def test_attention_bad_options_raise_value_error():
    args = _good_attention_args()
    with pytest.raises(ValueError, match="sliding_window"):
        ragged_paged_attention(**args, sm_scale=0.125, sliding_window=0)
    with pytest.raises(ValueError, match="soft_cap"):
        ragged_paged_attention(**args, sm_scale=0.125, soft_cap=-1.0)
    with pytest.raises(ValueError, match="takes no `layer`"):
        ragged_paged_attention(**args, sm_scale=0.125, layer=jnp.int32(0))
    with pytest.raises(ValueError, match="tiling"):
        ragged_paged_attention(**args, sm_scale=0.125, tiling=Tiling(8, 1, 1, 1, 1, 1))


@pytest.mark.parametrize("fn", [kv_cache_write, kv_cache_write_reference])
@pytest.mark.parametrize("change,match", [
    (dict(k_new=jnp.zeros((5, 3, 64), jnp.float32)), r"\[T, 2, 64\]"),
    (dict(k_new=jnp.zeros((5, 2, 64), jnp.bfloat16), v_new=jnp.zeros((5, 2, 64), jnp.bfloat16)), "dtype"),
    (dict(slot_mapping=jnp.zeros((4,), jnp.int32)), r"slot_mapping must be \[5\] int32"),
    (dict(slot_mapping=jnp.zeros((5,), jnp.float32)), "int32"),
    (dict(v_pages=jnp.zeros((2, 10, 8, 32), jnp.float32)), "same shape"),
    (dict(layer=jnp.int32(0)), "takes no `layer`"),
])
def test_kv_cache_write_bad_input_raises_value_error_with_shapes(fn, change, match):
    args = dict(k_pages=jnp.zeros((2, 10, 8, 64), jnp.float32), v_pages=jnp.zeros((2, 10, 8, 64), jnp.float32),
                k_new=jnp.zeros((5, 2, 64), jnp.float32), v_new=jnp.zeros((5, 2, 64), jnp.float32),
                slot_mapping=jnp.zeros((5,), jnp.int32))
    args.update(change)
    layer = args.pop("layer", None)
    with pytest.raises(ValueError, match=match) as e:
        fn(**args, layer=layer)
    assert str(args["k_pages"].shape) in str(e.value) and str(args["k_new"].shape) in str(e.value)
