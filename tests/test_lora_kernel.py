"""The native multi-LoRA kernel (cpu_kernels/lora_matmul.cc) against numpy and against the jnp
reference it replaces (lora/weight.py): rows of several slots and base rows mixed, per-slot ranks
below max_lora_rank, ranks off the vector width, bucket padding rows, the layer index."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpu_kernels.lora_matmul import lora_matmul
from jaxpaged.lora.weight import lora_matmul_reference


def _problem(m, k, n, s, r, ranks, layers=2, seed=0):
    """Stacks a [L, S, K, R], b [L, S, R, N] zero past each slot's rank (as the device slots hold them)."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((layers, s, k, r)).astype(np.float32)
    b = rng.standard_normal((layers, s, r, n)).astype(np.float32)
    for i, rank in enumerate(ranks):
        a[:, i, :, rank:] = 0
        b[:, i, rank:, :] = 0
    x = rng.standard_normal((m, k)).astype(np.float32)
    y = rng.standard_normal((m, n)).astype(np.float32)
    slots = rng.integers(0, s + 1, m).astype(np.int32)
    return y, x, a, b, slots, np.asarray(ranks, np.int32)


def _numpy(y, x, a, b, slots, layer, rows):
    out = y.copy()
    for t in range(rows):
        if slots[t]:
            out[t] += (x[t] @ a[layer, slots[t] - 1]) @ b[layer, slots[t] - 1]
    return out


# (M, K, N, S, R, ranks): decode and prefill rows, tiles of 8 rows plus remainders, N and R off the
# vector width (scalar tails), an empty slot (rank 0), a slot below R (rank rounded up within R)
CASES = [(1, 64, 40, 1, 8, [8]), (5, 96, 70, 3, 16, [16, 0, 4]), (37, 576, 192, 4, 64, [64, 8, 0, 13]),
         (130, 32, 33, 2, 6, [6, 3]), (64, 48, 576, 16, 8, [8] * 8 + [2] * 8)]


@pytest.mark.parametrize("m,k,n,s,r,ranks", CASES)
def test_matches_numpy_and_the_reference(m, k, n, s, r, ranks):
    y, x, a, b, slots, ranks = _problem(m, k, n, s, r, ranks)
    rows = max(m - 3, 1)
    slots[rows:] = 0                           # bucket padding rows: slot 0, as the runner sends them
    native = jax.jit(lambda y, x, a, b, sl, rk, layer: lora_matmul(y, x, a, b, sl, rk, layer=layer, rows=rows))
    ref = jax.jit(lora_matmul_reference)
    for layer in range(a.shape[0]):
        want = _numpy(y, x, a, b, slots, layer, m)
        got = np.asarray(native(y, x, a, b, slots, ranks, jnp.int32(layer)))
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(np.asarray(ref(y, x, a, b, ranks, slots, jnp.int32(layer))), want,
                                   rtol=1e-4, atol=1e-3)


def test_rows_past_rows_keep_y_and_base_rows_are_untouched():
    y, x, a, b, slots, ranks = _problem(12, 32, 24, 2, 8, [8, 8])
    slots[:] = 1
    slots[3] = 0
    got = np.asarray(lora_matmul(jnp.asarray(y), x, a, b, slots, ranks, layer=1, rows=6))
    np.testing.assert_array_equal(got[6:], y[6:])          # padding rows: y as it was
    np.testing.assert_array_equal(got[3], y[3])            # a base row
    assert not np.allclose(got[:3], y[:3])


def test_rank_zero_slot_adds_nothing():
    y, x, a, b, slots, _ = _problem(9, 32, 16, 2, 8, [8, 8])
    got = np.asarray(lora_matmul(y, x, a, b, slots, np.zeros(2, np.int32), layer=0))
    np.testing.assert_array_equal(got, y)


def test_bad_stacks_are_a_value_error():
    with pytest.raises(ValueError, match="a \\[L, S, K, R\\]"):
        lora_matmul(jnp.zeros((2, 4)), jnp.zeros((2, 3)), jnp.zeros((3, 2, 4)), jnp.zeros((1, 2, 2, 4)),
                    jnp.zeros(2, jnp.int32), jnp.zeros(2, jnp.int32), layer=0)
