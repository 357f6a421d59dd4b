"""The Mosaic GPU attention kernel (attention_mosaic, jax >= 0.11) in Mosaic GPU's interpret mode on CPU.

The interpreter simulates the kernel's warpgroups, SMEM, TMA copies and barriers (it also checks
every barrier phase is observed), so the producer/consumer ring and the index arithmetic are
checked here against the jnp reference. jax 0.10 has no such kernel: CI runs this file in its
Python 3.12 venv with jax 0.11+ (.ci/run). Slow (~1 min: the interpreter runs each program's two
warpgroups as threads): one small batch covering split decode segments, multi-token decodes,
prefill blocks overrunning into the next sequence, a sliding window, soft cap, a padding sequence
and padding tokens.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

if jax.__version_info__ < (0, 11):
    pytest.skip("the Mosaic GPU kernel needs jax >= 0.11 (CI runs this file in its Python 3.12 venv)",
                allow_module_level=True)

from pallas_kernels import ragged_paged_attention   # noqa: E402
from pallas_kernels.attention_mosaic import mosaic_tiling, supports   # noqa: E402
from tests.test_kernels import check_against_reference, make_batch   # noqa: E402


@pytest.mark.parametrize("stages,compute_wgs", [(3, 1), (4, 2)])
def test_mosaic_kernel_in_interpret_mode_matches_reference(stages, compute_wgs):
    # Gp 2: 64 rows = 32 tokens per prefill block / decode tile; 3 KV segments per decode.
    # Two consumer warpgroups: chunks alternate between them, partials merged through SMEM.
    q_lens, seq_lens = [1, 5, 40, 1], [150, 100, 40, 9]
    x = make_batch(q_lens, seq_lens, num_heads=2, num_kv_heads=1, head_dim=64, block_size=16,
                   dtype=jnp.bfloat16, pad_tokens=2, window=70)      # pages before the window are NaN
    t = mosaic_tiling(2, 1, 64, splits=3, stages=stages, compute_wgs=compute_wgs)
    assert supports(jnp.bfloat16, 64, 16, t.group) and (t.q_block, t.decode_tokens) == (32, 32)
    check_against_reference(x, tiling=t, interpret=True, soft_cap=20.0, sliding_window=70)


def test_mosaic_kernel_takes_only_what_it_supports():
    assert not supports(jnp.float32, 64, 16, 4)      # f32 caches keep Triton
    assert not supports(jnp.bfloat16, 80, 16, 4)     # head_dim 80/96 keep Triton
    assert not supports(jnp.bfloat16, 64, 24, 4)     # pages must divide the 64-position chunk
    with pytest.raises(ValueError, match="must be 1 or 2 and divide stages"):
        mosaic_tiling(2, 1, 64, splits=1, stages=3, compute_wgs=2)   # a slot would change consumers
    x = make_batch([1], [20], num_heads=2, num_kv_heads=1, head_dim=64, block_size=24, dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match="Mosaic GPU kernel does not take"):
        ragged_paged_attention(x["q"], x["k"], x["v"], x["block_tables"], x["seq_lens"], x["query_start"],
                               sm_scale=0.1, interpret=True, tiling=mosaic_tiling(2, 1, 64, splits=1))
