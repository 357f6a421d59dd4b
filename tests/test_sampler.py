"""The jitted sampler: greedy, top-k / top-p / min-p against a sort-based reference of vLLM's rules, sampling
frequencies, penalties by hand, seeded determinism across batch compositions, min_tokens bans, raw logprobs."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpaged import sampler as S
from jaxpaged import sampler_filters as F
from jaxpaged.sampler import (SamplingRow, SamplingTensors, max_num_logprobs, needs_penalties, sample,
                              seeded_uniforms)
from jaxpaged.sampling_params import SamplingParams as SP

# One compiled variant serves most tests (compiles dominate this file's runtime): V = 256, rows padded
# to 256, a 64-token history (penalties on; zero penalties are a no-op) and 5 logprobs.
V = 256
B = 256
_jitted = jax.jit(sample, static_argnames=("num_logprobs", "use_penalties", "topk_cap"))


def _sample(logits, t, num_logprobs=5, **kw):
    return _jitted(logits, t, num_logprobs=num_logprobs, **kw)


def _build(params, logits, *, outputs=None, prompts=None, pad_to=None, seed=0, history_len=64, **kw):
    """SamplingTensors for `params` (None = padding row), padded to `pad_to` (default: the rows of logits)."""
    n = len(params)
    rows = [SamplingRow(p, (prompts or [()] * n)[i], (outputs or [()] * n)[i]) if p is not None else None
            for i, p in enumerate(params)]
    return SamplingTensors.build(rows, pad_to or logits.shape[0], logits.shape[1],
                                 generator=np.random.default_rng(seed), history_len=history_len,
                                 banned_width=8, **kw)


def _logits(rng, rows=B, scale=1.0):
    return (rng.standard_normal((rows, V)) * scale).astype(np.float32)


def _softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _reference_keep(s, top_k, top_p, min_p):
    """vLLM's filters on one row of scaled logits, with a full sort: min-p, top-k, then top-p."""
    s = np.asarray(s, np.float64)
    keep = np.ones_like(s, bool)
    if min_p > 0:
        p = _softmax(s)
        keep &= p >= min_p * p.max()
    if top_k > 0:
        kth = np.sort(np.where(keep, s, -np.inf))[::-1][top_k - 1]
        keep &= s >= kth
    if top_p < 1:
        p = _softmax(np.where(keep, s, -np.inf))
        order = np.argsort(-p, kind="stable")
        excl = np.cumsum(p[order]) - p[order]
        nucleus = np.zeros_like(keep)
        nucleus[order[excl < top_p]] = True
        keep &= nucleus
    return keep


# ---- greedy -----------------------------------------------------------------------------------------

def test_greedy_is_argmax_first_index_on_ties():
    logits = _logits(np.random.default_rng(0))
    logits[1, [7, 100, 250]] = 9.0            # tie: the first index wins, like argmax
    out = _sample(logits, _build([SP(temperature=0)] * B, logits))
    np.testing.assert_array_equal(np.asarray(out.tokens), logits.argmax(-1))
    assert int(out.tokens[1]) == 7


def test_top_k_1_tiny_top_p_and_min_p_1_equal_greedy():
    rng = np.random.default_rng(1)
    for trial in range(3):
        logits = _logits(rng, scale=2.0)
        greedy = np.asarray(_sample(logits, _build([SP(temperature=0)] * B, logits)).tokens)
        for params in (SP(temperature=0.8, top_k=1), SP(temperature=1.3, top_p=1e-6),
                       SP(temperature=1.0, top_k=1, seed=5), SP(temperature=0.5, min_p=1.0)):
            got = np.asarray(_sample(logits, _build([params] * B, logits, seed=trial)).tokens)
            np.testing.assert_array_equal(got, greedy, err_msg=str(params))


def test_padding_rows_and_mixed_batch():
    logits = _logits(np.random.default_rng(2))
    params = [SP(temperature=0), None, SP(temperature=1.0, top_k=1), None, SP(temperature=0.0)] + [None] * (B - 5)
    tok = np.asarray(_sample(logits, _build(params, logits)).tokens)
    assert tok[0] == logits[0].argmax() and tok[2] == logits[2].argmax() and tok[4] == logits[4].argmax()
    assert (np.delete(tok, [0, 2, 4]) == 0).all()


# ---- filters against the sort-based reference ---------------------------------------------------------

THRESHOLD_CONFIGS = [(0, 1.0, 0.0), (5, 1.0, 0.0), (50, 1.0, 0.0), (0, 0.9, 0.0), (0, 0.5, 0.0), (20, 0.8, 0.0),
                     (0, 1.0, 0.1), (0, 0.95, 0.02), (100, 0.7, 0.01), (3, 0.3, 0.5), (0, 0.999, 0.0)]


@jax.jit
def _thresholds_and_fallback(s, t):
    """The filters' thresholds for rows of scaled logits s (temperature 1), and whether a row's kept set
    fell outside the 128 candidates (the exact full-row paths)."""
    f = F.filter_rows(s, t, t.temperature <= 0, 128)
    return f.thr, jnp.any(~f.fits & (t.temperature > 0) & ((t.top_k > 0) | (t.top_p < 1.0)))


@pytest.mark.parametrize("path", ["fast", "exact"])
def test_thresholds_match_sorted_reference(path):
    """Both the candidate path and the exact bisection fallback give vLLM's kept sets."""
    rng = np.random.default_rng(3)
    configs = list(THRESHOLD_CONFIGS)
    scales = [3.0] * len(configs)                         # peaked rows: nuclei fit in 128 candidates
    if path == "exact":                                   # flat rows and a top_k above the cap
        configs = configs * 2 + [(200, 1.0, 0.0), (130, 0.99, 0.0)]
        scales = scales + [0.3] * (len(configs) - len(scales))
    rows = 32                                             # one compiled shape for both paths
    s = (rng.standard_normal((rows, V)) * np.array(scales + [1.0] * (rows - len(configs)))[:, None])
    s = s.astype(np.float32)
    params = [SP(temperature=1.0, top_k=k, top_p=p, min_p=mp) for k, p, mp in configs]
    thr, fell_back = _thresholds_and_fallback(s, _build(params + [None] * (rows - len(params)), s))
    assert bool(fell_back) == (path == "exact")
    keep = s >= np.asarray(thr)[:, None]
    for b, (k, p, mp) in enumerate(configs):
        ref = _reference_keep(s[b], k, p, mp)
        np.testing.assert_array_equal(keep[b], ref, err_msg=f"row {b}: top_k={k} top_p={p} min_p={mp}")


def test_no_full_sort_in_compiled_sampler():
    """XLA:CPU may lower a values-only top_k to a sort of the whole row (seconds at V=49152); the
    compiled sampler must hold TopK custom calls only (reuses the tests' compiled variant)."""
    logits = np.zeros((B, V), np.float32)
    t = _build([SP(temperature=0.7, top_k=40, top_p=0.9)] * B, logits)
    hlo = _jitted.lower(logits, t, num_logprobs=5).compile().as_text()
    sorts = [ln for ln in hlo.splitlines() if " sort(" in ln and f"{V}]" in ln]
    assert not sorts, sorts[:2]


# ---- sampling frequencies -----------------------------------------------------------------------------

N_DRAWS = 4096
BASE = np.array([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0], np.float32)


def _frequencies(params, seed=0):
    row = np.full(V, -1e4, np.float32)        # 8 live tokens, the rest never drawn
    row[:8] = BASE
    logits = np.tile(row, (B, 1))
    tok = np.concatenate([np.asarray(_sample(logits, _build([params] * B, logits, seed=seed * 100 + i)).tokens)
                          for i in range(N_DRAWS // B)])
    assert tok.max() < 8
    return np.bincount(tok, minlength=8) / N_DRAWS


def test_temperature_frequencies_match_softmax():
    for temp in (0.7, 1.0, 2.0):
        freq = _frequencies(SP(temperature=temp))
        np.testing.assert_allclose(freq, _softmax(BASE / temp), atol=0.03, err_msg=f"T={temp}")


def test_top_k_top_p_min_p_frequencies():
    p = _softmax(BASE / 0.8)
    # top_k=3: renormalized over the 3 best
    freq = _frequencies(SP(temperature=0.8, top_k=3))
    want = np.where(np.arange(8) < 3, p, 0)
    np.testing.assert_allclose(freq, want / want.sum(), atol=0.03)
    assert freq[3:].sum() == 0
    # top_p=0.6: vLLM's rule keeps tokens while the mass before them is < 0.6
    keep = _reference_keep(BASE / 0.8, 0, 0.6, 0.0)
    freq = _frequencies(SP(temperature=0.8, top_p=0.6))
    want = np.where(keep, p, 0)
    np.testing.assert_allclose(freq, want / want.sum(), atol=0.03)
    assert freq[~keep].sum() == 0
    # min_p=0.2: tokens with p >= 0.2 * max p
    freq = _frequencies(SP(temperature=0.8, min_p=0.2))
    keep = p >= 0.2 * p.max()
    want = np.where(keep, p, 0)
    np.testing.assert_allclose(freq, want / want.sum(), atol=0.03)
    assert freq[~keep].sum() == 0 and keep.sum() >= 3


def test_exact_fallback_path_samples_within_top_k():
    """top_k above the candidate cap (128) goes through the bisection path."""
    rng = np.random.default_rng(4)
    logits = np.tile(rng.standard_normal(V).astype(np.float32), (B, 1))
    allowed = set(np.argsort(-logits[0])[:200].tolist())
    seen = set()
    for seed in range(2):
        tok = np.asarray(_sample(logits, _build([SP(temperature=3.0, top_k=200)] * B, logits, seed=seed)).tokens)
        seen |= set(tok.tolist())
    assert seen <= allowed and len(seen) > 20


# ---- keys / seeds -------------------------------------------------------------------------------------

def test_seeded_uniforms_depend_on_seed_and_offset_only():
    u = seeded_uniforms(np.array([7, 7, 99, 7], np.uint64), np.array([3, 0, 1, 3], np.uint64))
    assert u.dtype == np.float32 and u.shape == (4, 2) and ((u >= 0) & (u < 1)).all()
    np.testing.assert_array_equal(u[0], u[3])
    assert len({tuple(r) for r in u[:3].tolist()}) == 3
    logits = np.zeros((3, V), np.float32)
    t = _build([SP(seed=7), SP(seed=7), SP(seed=-5)], logits, outputs=[[1, 2, 3], [], [5]])
    np.testing.assert_array_equal(t.uniforms[0], u[0])
    np.testing.assert_array_equal(t.uniforms[1], u[1])
    np.testing.assert_array_equal(t.uniforms[2], seeded_uniforms(np.array([2 ** 64 - 5], np.uint64),
                                                                 np.array([1], np.uint64))[0])
    # roughly uniform
    many = seeded_uniforms(np.arange(20000, dtype=np.uint64), np.zeros(20000, np.uint64))
    hist = np.histogram(many, bins=10, range=(0, 1))[0] / many.size
    np.testing.assert_allclose(hist, 0.1, atol=0.01)


def test_seeded_tokens_independent_of_batch_composition():
    rng = np.random.default_rng(5)
    row = rng.standard_normal(V).astype(np.float32)
    target = SP(temperature=1.0, top_p=0.95, seed=1234)
    results = []
    for trial, (n, pos) in enumerate([(4, 0), (8, 6), (16, 11), (9, 2)]):
        logits = _logits(rng, scale=3.0)
        logits[pos] = row
        others = [SP(temperature=0.9), SP(temperature=0), SP(seed=trial, top_k=5), None]
        params = [others[(i + trial) % 4] for i in range(n)]
        params[pos] = target
        outputs = [[9] * i for i in range(n)]
        outputs[pos] = [3, 1, 4]
        t = _build(params, logits, outputs=outputs, seed=100 + trial, pad_to=B)
        results.append(int(_sample(logits, t).tokens[pos]))
    assert len(set(results)) == 1, results
    # the offset (tokens generated so far) changes the draw
    draws = set()
    for k in range(8):
        logits = np.tile(row, (B, 1))
        t = _build([target, None], logits, outputs=[[0] * k, []], pad_to=B)
        draws.add(int(_sample(logits, t).tokens[0]))
    assert len(draws) > 3


def test_unseeded_rows_follow_the_generator():
    logits = _logits(np.random.default_rng(6))
    a = _sample(logits, _build([SP()] * B, logits, seed=11)).tokens
    b = _sample(logits, _build([SP()] * B, logits, seed=11)).tokens
    c = _sample(logits, _build([SP()] * B, logits, seed=12)).tokens
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))


# ---- penalties / bans ---------------------------------------------------------------------------------

def test_penalties_match_hand_computation():
    logits = np.zeros((1, V), np.float32)
    logits[0, :8] = [1.0, 2.0, -1.0, 0.5, 3.0, -2.0, 0.0, 1.5]
    prompt, output = [1, 2, 2], [2, 3, 3, 3]
    p = SP(repetition_penalty=1.5, frequency_penalty=0.3, presence_penalty=0.2)
    t = _build([p], logits, prompts=[prompt], outputs=[output])
    got = np.asarray(jax.jit(S.apply_penalties)(logits, t))[0]
    want = logits[0].astype(np.float64).copy()
    # repetition: tokens in prompt or output (1, 2, 3): positive / 1.5, negative * 1.5
    want[1] = 2.0 / 1.5
    want[2] = -1.0 * 1.5
    want[3] = 0.5 / 1.5
    # frequency (output counts: 2 -> 1, 3 -> 3) and presence (2, 3)
    want[2] -= 0.3 * 1 + 0.2
    want[3] -= 0.3 * 3 + 0.2
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_penalties_change_greedy_choice_only_where_asked():
    logits = np.zeros((B, V), np.float32)
    logits[:, 0], logits[:, 1] = 5.0, 4.9
    params = [SP(temperature=0, presence_penalty=0.5), SP(temperature=0),
              SP(temperature=0, frequency_penalty=2.0), SP(temperature=0, repetition_penalty=2.0)]
    t = _build(params, logits, prompts=[[], [0], [0, 0, 0], [0]], outputs=[[0], [0, 0], [], []])
    assert needs_penalties([SamplingRow(p) for p in params])
    # presence/frequency count output tokens only; repetition also counts the prompt
    assert np.asarray(_sample(logits, t).tokens)[:4].tolist() == [1, 0, 0, 1]


def test_min_tokens_bans_eos_and_stop_ids():
    logits = np.zeros((B, V), np.float32)
    logits[:, 2] = 10.0          # eos
    logits[:, 7] = 9.0           # a stop token id
    logits[:, 5] = 8.0
    params = [SP(temperature=0, min_tokens=3, stop_token_ids=[7])] * 3 + [SP(temperature=0, min_tokens=3,
                                                                             ignore_eos=True)]
    t = _build(params, logits, outputs=[[1], [1, 1, 1], [], [1]], eos_token_ids=[2])
    assert sorted(t.banned_ids[0][t.banned_ids[0] >= 0].tolist()) == [2, 7]
    assert (t.banned_ids[1] == -1).all()                    # min_tokens reached: nothing banned
    assert np.asarray(_sample(logits, t).tokens)[:4].tolist() == [5, 2, 5, 2]   # ignore_eos: eos allowed
    t = _build([SP(temperature=1.0, min_tokens=2)] * B, logits, eos_token_ids=[2])
    assert 2 not in np.asarray(_sample(logits, t).tokens).tolist()


# ---- logprobs -----------------------------------------------------------------------------------------

def test_logprobs_are_raw_log_softmax_with_ranks():
    logits = _logits(np.random.default_rng(7), scale=2.0)
    params = [SP(temperature=0), SP(temperature=1.0), SP(temperature=0.5, top_k=20),
              SP(temperature=0, repetition_penalty=1.8), SP(temperature=2.0, seed=3),
              SP(temperature=0, min_tokens=4)] * 2 + [None] * (B - 12)
    prompts = [[]] * 3 + [[int(logits[3].argmax())]] + [[]] * (B - 4)
    t = _build(params, logits, prompts=prompts, eos_token_ids=[int(logits[5].argmax())])
    out = _sample(logits, t)
    ref = np.asarray(jax.nn.log_softmax(jnp.asarray(logits), axis=-1))
    tok = np.asarray(out.tokens)
    rows = np.arange(B)
    np.testing.assert_allclose(np.asarray(out.logprob), ref[rows, tok], atol=1e-5)
    np.testing.assert_array_equal(np.asarray(out.rank), (logits >= logits[rows, tok][:, None]).sum(-1))
    assert int(out.rank[0]) == 1 and int(out.rank[3]) == 2 and int(out.rank[5]) == 2   # penalty / ban
    order = np.argsort(-logits, axis=-1)[:, :5]
    np.testing.assert_array_equal(np.asarray(out.top_ids), order)
    np.testing.assert_allclose(np.asarray(out.top_logprobs), np.take_along_axis(ref, order, -1), atol=1e-5)
    assert out.top_ids.dtype == jnp.int32 and out.rank.dtype == jnp.int32


def test_num_logprobs_variants():
    rows = [SamplingRow(SP(temperature=0, logprobs=None)), SamplingRow(SP(temperature=0, logprobs=3)), None]
    assert max_num_logprobs(rows) == 3 and max_num_logprobs(rows[:1]) is None
    assert max_num_logprobs([SamplingRow(SP(logprobs=0))]) == 0
    logits = _logits(np.random.default_rng(8))
    t = _build([SP(temperature=0)] * B, logits, history_len=None)
    out = _sample(logits, t, num_logprobs=None)
    assert (np.asarray(out.logprob) == 0).all() and out.top_ids.shape == (B, 0)
    np.testing.assert_array_equal(np.asarray(out.tokens), logits.argmax(-1))
    lp, rank, top_ids, top_lp = jax.jit(S.token_logprobs, static_argnums=2)(logits, jnp.asarray(logits.argmax(-1)), 0)
    assert top_ids.shape == (B, 0) and top_lp.shape == (B, 0) and (np.asarray(rank) == 1).all()


def test_build_layout():
    logits = np.zeros((2, 32), np.float32)
    params = [SP(temperature=0.7, top_k=50, top_p=0.9, min_p=0.05, seed=3, repetition_penalty=1.1), SP()]
    t = _build(params, logits, prompts=[[4, 5], [6]], outputs=[[7], []], pad_to=4, history_len=None)
    assert t.temperature.tolist() == pytest.approx([0.7, 1.0, -1.0, -1.0])
    assert t.top_k.tolist() == [0, 0, 0, 0]                 # top_k >= vocab is off
    np.testing.assert_array_equal(t.uniforms[0], seeded_uniforms(np.array([3], np.uint64), np.array([1], np.uint64))[0])
    assert t.history.shape == (4, 64) and t.history[0, :3].tolist() == [4, 5, 7] and (t.history[1] == -1).all()
    assert t.prompt_len.tolist() == [2, 0, 0, 0]
    assert t.history.dtype == np.int32 and t.uniforms.dtype == np.float32
    assert _build([SP()], logits[:1], history_len=None).history.shape == (1, 0)   # no penalties, no history
    with pytest.raises(ValueError, match="history_len"):
        _build(params, logits, prompts=[list(range(10)), []], outputs=[[], []], history_len=4)
    with pytest.raises(ValueError, match="pad_to"):
        _build(params, logits, pad_to=1)
