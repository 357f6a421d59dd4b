"""Sorting-free top-k / top-p / min-p (sampler_filters.py): candidates and kept sets against a sort-based
numpy reference, sampled frequencies against the exact distribution (chi-square) on every path (the 128
candidates, wide top-k, wide nuclei, whole-row draws), batch independence of seeded rows across paths, and
processed_logits / processed_probs."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpaged import sampler_filters as F
from jaxpaged.sampler import SamplingRow, SamplingTensors, processed_logits, processed_probs, sample
from jaxpaged.sampling_params import SamplingParams as SP

_sample = jax.jit(sample, static_argnames=("num_logprobs", "use_penalties", "topk_cap"))


def _tensors(params, V, *, seed=0, pad_to=None, outputs=None):
    rows = [SamplingRow(p, (), (outputs or [()] * len(params))[i]) if p is not None else None
            for i, p in enumerate(params)]
    return SamplingTensors.build(rows, pad_to or len(rows), V, generator=np.random.default_rng(seed),
                                 history_len=0, banned_width=8)


def _kept(s, top_k=0, top_p=1.0, min_p=0.0):
    """vLLM's filters on one row of scaled logits by sorting (float64), ties at each threshold kept."""
    s = np.asarray(s, np.float64)
    thr = -np.inf
    if min_p > 0:
        thr = s.max() + np.log(min_p)
    if top_k > 0:
        thr = max(thr, np.sort(s)[::-1][top_k - 1])
    if top_p < 1:
        e = np.where(s >= thr, np.exp(s - s.max()), 0.0)
        order = np.argsort(-s, kind="stable")
        p = e[order] / e.sum()
        n_keep = int(np.sum(np.cumsum(p) - p < top_p))
        thr = max(thr, s[order[n_keep - 1]])
    return s >= thr


def _inv(temperature):
    """The sampler's scale: s = x * (1 / temperature) in f32."""
    return np.float32(1.0) / np.float32(temperature)


def _exact(s, keep):
    e = np.where(keep, np.exp(np.asarray(s, np.float64) - np.max(s)), 0.0)
    return e / e.sum()


def test_candidates_are_the_largest_values_with_their_ids():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 9000)).astype(np.float32)
    x[1, :500] = 7.0                                   # ties across many groups
    x[2, 100:9000] = -np.inf                           # fewer finite values than candidates
    x[3] = np.round(x[3] * 4)                          # heavy ties
    x[4, ::37] = 5.0                                   # one candidate per group
    vals, ids = jax.jit(F.candidates, static_argnums=1)(x, 128)
    vals, ids = np.asarray(vals), np.asarray(ids)
    for b in range(x.shape[0]):
        np.testing.assert_array_equal(vals[b], np.sort(x[b])[::-1][:128], err_msg=f"row {b}")
        np.testing.assert_array_equal(x[b, ids[b]], vals[b], err_msg=f"row {b}")
        assert (ids[b] >= 0).all() and (ids[b] < 9000).all()
        finite = np.isfinite(vals[b])
        assert len(set(ids[b][finite].tolist())) == finite.sum()        # distinct tokens


@jax.jit
def _filter(x, t):
    f = F.filter_rows(x, t, t.temperature <= 0, 128)
    return f.thr, f.fits


CONFIGS = [(50, 0.95, 0.0), (50, 1.0, 0.0), (0, 0.9, 0.0), (0, 0.95, 0.05), (0, 1.0, 0.1), (20, 0.8, 0.0),
           (127, 1.0, 0.0), (128, 0.99, 0.0), (200, 1.0, 0.0), (300, 0.9, 0.0), (3, 0.3, 0.5), (0, 1.0, 0.0)]


@pytest.mark.parametrize("scale", [6.0, 0.5])
def test_kept_sets_match_sorted_reference_at_full_vocabulary_scale(scale):
    """V = 9000 takes the grouped-candidate path; scale 6 gives peaked rows (nuclei inside the candidates),
    0.5 flat ones (nuclei and top-k beyond them: the exact bisections)."""
    rng = np.random.default_rng(1)
    V, temp = 9000, 0.8
    x = (rng.standard_normal((len(CONFIGS), V)) * scale).astype(np.float32)
    x[:, :5] = x[:, 5:6]                                  # a tie at the top
    params = [SP(temperature=temp, top_k=k, top_p=p, min_p=mp) for k, p, mp in CONFIGS]
    thr, fits = _filter(x, _tensors(params, V))
    keep = (x * _inv(temp)) >= np.asarray(thr)[:, None]
    for b, (k, p, mp) in enumerate(CONFIGS):
        ref = _kept(x[b] * _inv(temp), k, p, mp)
        np.testing.assert_array_equal(keep[b], ref, err_msg=f"row {b}: top_k={k} top_p={p} min_p={mp}")
        assert bool(fits[b]) == (ref.sum() < 128 and np.sort(x[b])[::-1][127] * _inv(temp) < thr[b])
    assert bool(fits[0]) and not bool(fits[8])          # top_k 50 fits; top_k 200 does not


# ---- sampled frequencies: chi-square against the exact distribution -----------------------------------

def _chi2_critical(df: int, z: float = 3.719) -> float:
    """Upper critical value of chi-square with df degrees of freedom at alpha 1e-4 (Wilson-Hilferty)."""
    return df * (1 - 2 / (9 * df) + z * np.sqrt(2 / (9 * df))) ** 3


def _small_row(V):
    rng = np.random.default_rng(2)
    row = np.full(V, -np.inf, np.float32)                 # 24 live tokens scattered over the vocabulary
    live = rng.choice(V, 24, replace=False)
    row[live] = np.round(rng.standard_normal(24) * 1.5, 2)
    row[live[3]] = row[live[4]]                           # a tie somewhere in the middle
    return row


FREQ_CONFIGS = [SP(temperature=0.8, top_k=5), SP(temperature=0.8, top_p=0.7), SP(temperature=0.8, top_k=8, top_p=0.8),
                SP(temperature=0.8, min_p=0.1), SP(temperature=1.3), SP(temperature=0.8, top_k=12, min_p=0.05)]


@pytest.mark.parametrize("V,cap", [(24, 128), (24, 4), (600, 8)], ids=["all-candidates", "wide-paths", "grouped"])
def test_frequencies_match_exact_distribution(V, cap):
    """(24, 128): every token a candidate; (24, 4): top_k > cap, nuclei wider than the candidates and
    whole-row draws; (600, 8): the grouped candidate search, kept sets inside and beyond it."""
    row = _small_row(V)
    B, draws = 512, 8192
    logits = np.tile(row, (B, 1))
    for params in FREQ_CONFIGS:
        keep = _kept(row * _inv(params.temperature), params.top_k, params.top_p, params.min_p)
        want = _exact(row * _inv(params.temperature), keep)
        counts = np.zeros(V)
        for i in range(draws // B):
            tok = np.asarray(_sample(logits, _tensors([params] * B, V, seed=i), num_logprobs=None, topk_cap=cap).tokens)
            counts += np.bincount(tok, minlength=V)
        assert counts[want == 0].sum() == 0, params
        k = np.flatnonzero(want > 0)
        chi2 = float(np.sum((counts[k] - draws * want[k]) ** 2 / (draws * want[k])))
        assert chi2 < _chi2_critical(len(k) - 1), (params, chi2, len(k))


def test_seeded_row_same_token_whatever_path_the_batch_takes():
    """The batch's other rows switch the full-row paths on or off; a seeded row's token stays."""
    V = 24
    row = _small_row(V)
    logits = np.tile(row, (8, 1))
    for target in (SP(temperature=0.9, top_k=3, seed=11), SP(temperature=0.9, top_p=0.9, seed=12),
                   SP(temperature=0.9, seed=13)):
        got = set()
        for others in (SP(temperature=0), SP(temperature=0.7, top_k=2), SP(temperature=2.0),
                       SP(temperature=0.5, top_k=20, top_p=0.95), SP(temperature=1.0, min_p=0.2)):
            for step in range(3):
                t = _tensors([others] * 3 + [target] + [None] * 4, V, seed=step,
                             outputs=[[]] * 3 + [[1] * step] + [[]] * 4)
                got.add((step, int(_sample(logits, t, num_logprobs=None, topk_cap=4).tokens[3])))
        assert len(got) == 3, (target, sorted(got))


def test_processed_probs_are_the_sampled_distribution():
    V = 600
    row = _small_row(V)
    params = [SP(temperature=0.8, top_k=5), SP(temperature=0.8, top_p=0.7, min_p=0.05), SP(temperature=1.3),
              SP(temperature=0), None]
    logits = np.tile(row, (len(params), 1))
    t = _tensors(params, V)
    probs = np.asarray(jax.jit(processed_probs, static_argnames="topk_cap")(logits, t, topk_cap=8))
    for b, p in enumerate(params[:3]):
        want = _exact(row * _inv(p.temperature), _kept(row * _inv(p.temperature), p.top_k, p.top_p,
                                                             p.min_p))
        np.testing.assert_allclose(probs[b], want, atol=1e-6, err_msg=str(p))
    assert probs[3, row.argmax()] == 1.0 and probs[4, row.argmax()] == 1.0     # greedy / padding: one-hot
    lg = np.asarray(jax.jit(processed_logits)(logits, t))
    assert np.isneginf(lg[0]).sum() == V - 5
