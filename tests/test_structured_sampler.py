"""The sampler's structured-output mask and logit_bias: a masked token is never sampled, whatever the
sampling settings; the packed mask unpacks as llguidance packs it; biases add where asked."""
from __future__ import annotations

import jax
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxpaged.sampler import SamplingRow, SamplingTensors, apply_token_bitmask, sample
from jaxpaged.sampling_params import SamplingParams as SP

V, B = 320, 8
_jitted = jax.jit(sample, static_argnames=("num_logprobs", "use_penalties", "topk_cap"))


class FixedMask:
    """A GrammarState stand-in whose mask is a fixed set of allowed ids."""

    def __init__(self, allowed):
        self.allowed = np.asarray(sorted(allowed), np.int64)


def _pack(allowed_rows, width):
    mask = np.zeros((len(allowed_rows), width), np.int64)
    for b, ids in enumerate(allowed_rows):
        for t in ids:
            mask[b, t // 32] |= 1 << (t % 32)
    return mask.astype(np.uint32).view(np.int32)


def test_bitmask_unpacks_bit_t_mod_32_of_word_t_div_32():
    rng = np.random.default_rng(0)
    allowed = [set(rng.choice(V, size=int(rng.integers(1, V)), replace=False).tolist()) for _ in range(B)]
    mask = _pack(allowed, (V + 31) // 32)
    out = np.asarray(apply_token_bitmask(jax.numpy.zeros((B, V)), mask))
    for b in range(B):
        assert set(np.flatnonzero(np.isfinite(out[b])).tolist()) == allowed[b]


def _tensors(params, masks, seed):
    rows = [SamplingRow(p, (1, 2, 3), (4, 5), grammar=None) for p in params]
    t = SamplingTensors.build(rows, B, V, generator=np.random.default_rng(seed), history_len=64,
                              banned_width=8)
    # the mask operand as fill_bitmasks would write it: constrained rows packed, others all ones
    t.allowed = _pack(masks, (V + 31) // 32)
    return t


sampling = st.fixed_dictionaries(dict(
    temperature=st.sampled_from([0.0, 0.5, 1.0, 2.0]), top_k=st.sampled_from([0, 1, 3, 50]),
    top_p=st.sampled_from([1.0, 0.9, 0.3]), min_p=st.sampled_from([0.0, 0.1]),
    repetition_penalty=st.sampled_from([1.0, 1.3]), seed=st.integers(0, 2 ** 31),
    bias=st.dictionaries(st.integers(0, V - 1), st.floats(-100, 100), max_size=4)))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(sampling, min_size=B, max_size=B), st.lists(st.sets(st.integers(0, V - 1), min_size=1, max_size=40),
                                                            min_size=B, max_size=B), st.integers(0, 2 ** 31))
def test_a_masked_token_is_never_sampled(rows, masks, seed):
    params = [SP(temperature=r["temperature"], top_k=r["top_k"], top_p=r["top_p"], min_p=r["min_p"],
                 repetition_penalty=r["repetition_penalty"], seed=r["seed"], logit_bias=r["bias"] or None)
              for r in rows]
    t = _tensors(params, masks, seed)
    # logits that favour masked tokens strongly: the mask must still win
    logits = np.random.default_rng(seed).standard_normal((B, V)).astype(np.float32) * 5
    for b, ids in enumerate(masks):
        logits[b, list(ids)] -= 50.0
    out = _jitted(logits, t, num_logprobs=2, use_penalties=True)
    for b, tok in enumerate(np.asarray(out.tokens)):
        assert int(tok) in masks[b], (b, int(tok), params[b])


def test_logit_bias_adds_to_the_named_ids_only():
    logits = np.zeros((B, V), np.float32)
    params = [SP(temperature=0.0, logit_bias={7: 5.0, 300: -3.0})] + [SP(temperature=0.0)] * (B - 1)
    rows = [SamplingRow(p) for p in params]
    t = SamplingTensors.build(rows, B, V, generator=np.random.default_rng(0), banned_width=8)
    assert t.bias_ids.shape == (B, 8) and t.allowed.shape == (B, 0)
    out = _jitted(logits, t, num_logprobs=None)
    assert np.asarray(out.tokens).tolist() == [7] + [0] * (B - 1)


def test_no_bias_and_no_grammar_add_no_operands():
    t = SamplingTensors.build([SamplingRow(SP())], B, V, generator=np.random.default_rng(0), banned_width=8)
    assert t.bias_ids.shape == (B, 0) and t.bias_vals.shape == (B, 0) and t.allowed.shape == (B, 0)


def test_the_grammar_wins_over_a_min_tokens_ban():
    """A row whose grammar allows only eos while min_tokens bans eos still samples eos (a masked token
    never); a row with other allowed tokens keeps the ban."""
    eos = 2
    params = [SP(temperature=0.0, min_tokens=5), SP(temperature=1.0, seed=1, min_tokens=5)] + [SP()] * (B - 2)
    rows = [SamplingRow(p) for p in params]
    t = SamplingTensors.build(rows, B, V, generator=np.random.default_rng(0), eos_token_ids=(eos,), banned_width=8)
    t.allowed = _pack([{eos}, {eos}] + [{eos, 7}] * (B - 2), (V + 31) // 32)
    logits = np.zeros((B, V), np.float32)
    logits[:, eos] = 10.0                    # eos is the model's favourite everywhere
    params_min = [SP(temperature=0.0, min_tokens=5)] * B
    t2 = SamplingTensors.build([SamplingRow(p) for p in params_min], B, V, generator=np.random.default_rng(0),
                               eos_token_ids=(eos,), banned_width=8)
    t2.allowed = t.allowed
    out = np.asarray(_jitted(logits, t, num_logprobs=None).tokens)
    assert out[:2].tolist() == [eos, eos]
    assert np.asarray(_jitted(logits, t2, num_logprobs=None).tokens)[2:].tolist() == [7] * (B - 2)
