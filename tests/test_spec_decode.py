"""Speculative decoding (n-gram drafts verified in the ragged step): config checks, the proposer, the
scheduler/block-manager rollback, and end-to-end exactness against the non-speculative engine."""
import math
import re

import numpy as np
import pytest

from jaxpaged import SamplingParams
from jaxpaged.block_manager import BlockManager
from jaxpaged.engine_config import EngineConfig
from jaxpaged.scheduler import Scheduler
from jaxpaged.sequence import Sequence, SequenceStatus
from jaxpaged.spec_decode.config import SpeculativeConfig
from jaxpaged.spec_decode.ngram import propose_ngram
from tests.engine_utils import make_llm
from tests.tiny_models import TEXT

NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
ENGINE = dict(max_model_len=256, block_size=8, max_num_seqs=8, max_num_batched_tokens=64)


# ---- config ----------------------------------------------------------------------------------------
def test_config_parses_vllm_dict_and_json_text():
    c = EngineConfig(speculative_config=NGRAM).speculative_config
    assert (c.method, c.num_speculative_tokens, c.prompt_lookup_max, c.prompt_lookup_min) == ("ngram", 3, 3, 1)
    j = EngineConfig(speculative_config='{"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 4}')
    assert (j.speculative_config.prompt_lookup_max, j.speculative_config.prompt_lookup_min) == (4, 4)
    d = SpeculativeConfig.parse({"model": "smollm2-135m-instruct", "num_speculative_tokens": 4})
    assert (d.method, d.model) == ("draft_model", "smollm2-135m-instruct")
    assert EngineConfig().speculative_config is None


@pytest.mark.parametrize("bad, field", [
    ({"method": "eagle", "num_speculative_tokens": 2}, "speculative_config.method"),
    ({"method": "ngram"}, "speculative_config.num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "speculative_config.num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": "3"}, "speculative_config.num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": 2, "lookahead": 1}, "speculative_config.lookahead"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 1, "prompt_lookup_min": 2},
     "speculative_config.prompt_lookup_max"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 0}, "speculative_config.prompt_lookup_min"),
    ({"method": "ngram", "num_speculative_tokens": 2, "model": "x"}, "speculative_config.model"),
    ({"num_speculative_tokens": 2}, "speculative_config.method"),
    ("{not json", "speculative_config"),
    ([1, 2], "speculative_config"),
])
def test_config_rejects_bad_input_naming_the_field(bad, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        EngineConfig(speculative_config=bad)


def test_server_flag_parses_json_and_rejects_bad(capsys):
    from jaxpaged.server.cli import parse_args
    _, config = parse_args(["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 2}'])
    assert config.speculative_config.num_speculative_tokens == 2
    with pytest.raises(SystemExit):
        parse_args(["--speculative-config", '{"method": "ngram"}'])
    assert "speculative_config.num_speculative_tokens" in capsys.readouterr().err


# ---- the proposer ----------------------------------------------------------------------------------
def test_ngram_proposes_what_followed_the_latest_earlier_match():
    assert propose_ngram([1, 2, 3, 4, 1, 2, 3], 3, 3, 1) == [4, 1, 2]
    assert propose_ngram([1, 2, 3, 9, 8, 1, 2, 3, 7, 1, 2, 3], 2, 3, 1) == [7, 1]    # the latest match wins
    assert propose_ngram([5, 2, 3, 9, 1, 3], 2, 3, 1) == [9, 1]                        # falls back to n = 1
    assert propose_ngram([5, 2, 3, 9, 1, 3], 2, 3, 2) == []                            # nothing of length >= 2
    assert propose_ngram([1, 2, 1], 5, 2, 1) == [2, 1]                                 # k past the end: shorter
    assert propose_ngram([7], 3, 3, 1) == []


# ---- scheduler and block manager ---------------------------------------------------------------------
def _decoding(sched, prompt, spec):
    seq = Sequence("a", prompt)
    sched.add_sequence(seq)
    out = sched.schedule()
    sched.update_from_output(out)
    sched.append_token("a", 9)
    seq.spec_token_ids = spec
    return seq


def test_budget_counts_drafts_and_rollback_returns_rejected_slots():
    sched = Scheduler(num_blocks=9, block_size=4, max_num_seqs=4, max_num_batched_tokens=8, max_model_len=64)
    bm = sched.block_manager
    seq = _decoding(sched, [1, 2, 3, 4, 5, 6, 7], [10, 11, 12, 13, 14, 15, 16, 17, 18])
    out = sched.schedule()                       # 1 + 7 tokens: the drafts are cut to the budget
    (ss,) = out.scheduled
    assert (ss.start, ss.num_new_tokens, ss.num_spec_tokens, ss.sample) == (7, 8, 7, True)
    assert out.num_batched_tokens == 8 and len(bm.get_table("a")) == 4     # slots for positions 7..14
    sched.update_from_output(out)
    assert seq.num_computed_tokens == 8          # the real token only
    for t in (10, 11, 99):                       # two drafts accepted, then the target's token
        sched.append_token("a", t)
    sched.commit_spec_tokens(seq, 2)
    assert seq.num_computed_tokens == 10 and bm.table_num_tokens("a") == 10
    assert len(bm.get_table("a")) == 3 and bm.num_free_blocks == 8 - 3   # the 4th block went back
    bm.check_invariants()
    sched.finish_sequence("a", SequenceStatus.FINISHED_ABORTED)
    assert bm.num_free_blocks == 8


def test_drafts_dropped_before_anyone_is_preempted():
    sched = Scheduler(num_blocks=4, block_size=4, max_num_seqs=4, max_num_batched_tokens=16, max_model_len=64)
    _decoding(sched, [1, 2, 3, 4, 5, 6, 7], [10, 11, 12, 13, 14])   # 2 blocks; 1 free: drafts need 2 more
    out = sched.schedule()
    (ss,) = out.scheduled
    assert (ss.num_new_tokens, ss.num_spec_tokens, out.preempted) == (1, 0, [])


def test_truncate_keeps_prefix_hashes_of_full_blocks_only():
    bm = BlockManager(8, 4)
    bm.allocate("a", 11)
    bm.cache_full_blocks("a", list(range(11)), 8)
    assert bm.truncate("a", 5) == 1 and len(bm.get_table("a")) == 2
    assert len(bm._tables["a"].hashes) == 1
    bm.check_invariants()
    with pytest.raises(ValueError, match="num_tokens"):
        bm.truncate("a", 9)


# ---- end to end --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pair(tiny_llama, tmp_path_factory):
    base = make_llm(tiny_llama, tmp_path_factory, **ENGINE)
    spec = make_llm(tiny_llama, tmp_path_factory, speculative_config=NGRAM, **ENGINE)
    return base, spec


def _prompts(tok):
    rng = np.random.default_rng(0)
    repeat = [tok.encode(TEXT[:160]), tok.encode("Hello world! Hello world! Hello world! Hello")]
    return repeat + [rng.integers(3, 320, int(n)).tolist() for n in (5, 40, 17)]


def _same(base, spec, prompts, params):
    a = base.generate(prompts, params, use_tqdm=False)
    b = spec.generate(prompts, params, use_tqdm=False)
    for x, y in zip(a, b):
        assert [(c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in x.outputs] == \
            [(c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in y.outputs]
    bm = spec.llm_engine.scheduler.block_manager
    assert bm.num_free_blocks == bm.num_total_blocks     # every block back
    bm.check_invariants()
    return a, b


def test_greedy_identical_and_drafts_accepted(pair):
    base, spec = pair
    prompts = _prompts(base.get_tokenizer())
    _, b = _same(base, spec, prompts, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))
    m = b[0].metrics
    assert m.spec_num_drafts > 0 and m.spec_num_accepted_tokens > 0
    assert m.spec_acceptance_rate == m.spec_num_accepted_tokens / m.spec_num_draft_tokens
    assert 1.0 < m.spec_mean_acceptance_length <= 4.0
    stats = spec.llm_engine.get_stats()
    assert stats.spec_decode_num_accepted_tokens >= m.spec_num_accepted_tokens
    assert sum(stats.spec_decode_num_accepted_tokens_per_pos) == stats.spec_decode_num_accepted_tokens


def test_max_tokens_stop_strings_min_tokens_logprobs_penalties_identical(pair):
    base, spec = pair
    tok = base.get_tokenizer()
    prompts = _prompts(tok)
    greedy_text = base.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True),
                                use_tqdm=False)[0].outputs[0].text
    stop = greedy_text[12:16]
    for params in (
        SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True),                 # never overshoots
        SamplingParams(temperature=0.0, max_tokens=30, stop=[stop]),
        SamplingParams(temperature=0.0, max_tokens=30, stop=[stop], include_stop_str_in_output=True),
        SamplingParams(temperature=0.0, max_tokens=20, min_tokens=12, logprobs=3),
        SamplingParams(temperature=0.0, max_tokens=20, repetition_penalty=1.3, frequency_penalty=0.5,
                       presence_penalty=0.2, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=20, logit_bias={5: 3.0, 7: -2.0}, ignore_eos=True),
    ):
        a, b = _same(base, spec, prompts, params)
        if params.logprobs is not None:
            for x, y in zip(a, b):
                lx, ly = x.outputs[0].logprobs, y.outputs[0].logprobs
                assert [list(e) for e in lx] == [list(e) for e in ly]
                assert np.allclose([[v.logprob for v in e.values()] for e in lx],
                                   [[v.logprob for v in e.values()] for e in ly], atol=1e-4)
    assert spec.llm_engine.get_stats().spec_decode_num_drafts > 0


def test_seeded_sampling_equals_non_speculative_and_n_gt_1(pair):
    base, spec = pair
    prompts = _prompts(base.get_tokenizer())
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=40, seed=7, max_tokens=24, ignore_eos=True)
    _, b = _same(base, spec, prompts, params)
    _, again = _same(base, spec, prompts, params)
    assert [o.outputs[0].token_ids for o in b] == [o.outputs[0].token_ids for o in again]
    _same(base, spec, prompts[:2], SamplingParams(n=3, temperature=1.0, seed=3, max_tokens=16, ignore_eos=True))


def test_abort_mid_speculation_frees_every_block(pair):
    _, spec = pair
    engine = spec.llm_engine
    prompt = spec.get_tokenizer().encode(TEXT[:160])
    before = engine.get_stats().spec_decode_num_drafts
    for i in range(3):
        engine.add_request(f"ab{i}", prompt, SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True))
    bm = engine.scheduler.block_manager
    for _ in range(50):
        engine.step()
        bm.check_invariants()
        for seq in engine.scheduler.running:      # tables cover exactly the computed tokens after a step
            assert bm.table_num_tokens(seq.seq_id) == seq.num_computed_tokens
        if engine.get_stats().spec_decode_num_drafts > before + 3:
            break
    assert engine.has_unfinished_requests() and engine.get_stats().spec_decode_num_drafts > before
    engine.abort_request([f"ab{i}" for i in range(3)])
    assert not engine.has_unfinished_requests()
    assert bm.num_free_blocks == bm.num_total_blocks
    bm.check_invariants()


def test_beam_search_and_batch_limit_do_not_speculate(tiny_llama, tmp_path_factory, pair):
    from jaxpaged.sampling_params import BeamSearchParams
    _, spec = pair
    engine = spec.llm_engine
    before = engine.get_stats().spec_decode_num_drafts
    prompt = spec.get_tokenizer().encode(TEXT[:80])
    spec.beam_search([{"prompt_token_ids": prompt}], BeamSearchParams(beam_width=2, max_tokens=8))
    assert engine.get_stats().spec_decode_num_drafts == before
    limited = make_llm(tiny_llama, tmp_path_factory, speculative_config={**NGRAM, "disable_by_batch_size": 1},
                       **ENGINE)
    limited.generate([prompt, prompt], SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True),
                     use_tqdm=False)
    assert limited.llm_engine.get_stats().spec_decode_num_drafts == 0


def _chi2_sf(x: float, df: int) -> float:
    """Survival function of the chi-square distribution (regularized upper gamma, series)."""
    a, z = df / 2.0, x / 2.0
    term = total = 1.0 / a
    for n in range(1, 500):
        term *= z / (a + n)
        total += term
    return 1.0 - math.exp(-z + a * math.log(z) - math.lgamma(a)) * total if z > 0 else 1.0


def test_sampled_tokens_follow_the_target_distribution(tiny_llama, tmp_path_factory):
    """temperature 1: the token after an accepted draft (the bonus row of a verification step) is
    distributed as the target's p(. | context), a chi-square test against the exact distribution (the
    engine's generator is seeded, so the outcome is fixed: no flakiness)."""
    cfg = dict(ENGINE, max_num_seqs=32, max_num_batched_tokens=128, max_logprobs=320)
    spec = make_llm(tiny_llama, tmp_path_factory, speculative_config=NGRAM, **cfg)
    base = make_llm(tiny_llama, tmp_path_factory, **cfg)
    favoured = [44, 307, 276, 225]                            # logit_bias concentrates the mass on these
    bias = {t: 6.0 for t in favoured}
    prompt = favoured * 4
    params = SamplingParams(temperature=1.0, max_tokens=3, ignore_eos=True, logit_bias=bias, n=32)
    outs = spec.generate([prompt] * 24, params, use_tqdm=False)
    seqs = [c.token_ids for o in outs for c in o.outputs]
    assert sum(o.metrics.spec_num_accepted_tokens for o in outs) > 50      # the bonus rows ran
    pairs = {}
    for t in seqs:
        pairs.setdefault(tuple(t[:2]), []).append(t[2])
    ctx, third = max(pairs.items(), key=lambda kv: len(kv[1]))
    # the exact processed distribution of the next token after prompt + ctx: raw logprobs + bias
    lp = base.generate([prompt + list(ctx)], SamplingParams(temperature=0.0, max_tokens=1, logprobs=320),
                       use_tqdm=False)[0].outputs[0].logprobs[0]
    logits = np.full(320, -np.inf)
    for t, v in lp.items():
        logits[t] = v.logprob + bias.get(t, 0.0)
    p = np.exp(logits - logits.max())
    p /= p.sum()
    cells = [t for t in np.argsort(-p) if p[t] * len(third) >= 5][:8]
    observed = [third.count(t) for t in cells] + [sum(1 for t in third if t not in cells)]
    expected = [p[t] * len(third) for t in cells] + [(1 - sum(p[t] for t in cells)) * len(third)]
    if expected[-1] < 5:                                      # fold a tiny remainder into the last cell
        observed[-2] += observed.pop()
        expected[-2] += expected.pop()
    stat = sum((o - e) ** 2 / e for o, e in zip(observed, expected))
    assert len(third) >= 100 and len(cells) >= 2
    assert _chi2_sf(stat, len(observed) - 1) > 1e-3, (observed, expected)


def test_warmup_covers_verification_steps_no_compiles_after(tiny_llama, tmp_path):
    from jaxpaged import LLM
    llm = LLM(tiny_llama, max_model_len=128, block_size=8, max_num_seqs=4, max_num_batched_tokens=32,
              download_dir=str(tmp_path), speculative_config=NGRAM)
    runner = llm.llm_engine.runner
    pairs, seq_buckets = runner.buckets.pairs(), runner.buckets.seq_buckets
    sampler_rows = set(seq_buckets) | {min(t, b * 4) for t, b in pairs}      # B and min(T, B * (1 + k))
    assert runner.num_compiled() == 2 * len(pairs) + len(sampler_rows)
    compiled = runner.num_compiled()
    tok = llm.get_tokenizer()
    prompts = [tok.encode(TEXT[i * 30: i * 30 + 90]) for i in range(6)] + [[5, 6, 7, 5, 6, 7, 5, 6]]
    params = [SamplingParams(temperature=t, seed=s, max_tokens=20, ignore_eos=True)
              for t, s in zip([0.0, 0.7, 1.0, 0.0, 0.5, 0.0, 1.0], [None, 1, 2, None, None, None, 3])]
    llm.generate(prompts, params, use_tqdm=False)
    assert llm.llm_engine.get_stats().spec_decode_num_accepted_tokens > 0
    assert runner.num_compiled() == compiled


def test_metrics_export_vllm_spec_decode_names(pair):
    from jaxpaged.server.metrics import ServerMetrics
    from tests.server_utils import parse_metrics
    _, spec = pair
    prompt = spec.get_tokenizer().encode(TEXT[:160])
    spec.generate([prompt], SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True), use_tqdm=False)
    stats = spec.llm_engine.get_stats()
    metrics = ServerMetrics("tiny")
    metrics.update_from_stats(stats)
    m = parse_metrics(metrics.render().decode())       # (summed over label sets)
    assert m["jaxpaged:spec_decode_num_drafts_total"] == stats.spec_decode_num_drafts > 0
    assert m["jaxpaged:spec_decode_num_draft_tokens_total"] == stats.spec_decode_num_draft_tokens
    assert m["jaxpaged:spec_decode_num_accepted_tokens_total"] == stats.spec_decode_num_accepted_tokens > 0
    pos0 = 'jaxpaged:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="tiny",position="0"}'
    assert m[pos0] == stats.spec_decode_num_accepted_tokens_per_pos[0]
    assert m["jaxpaged:spec_decode_num_accepted_tokens_per_pos_total"] == stats.spec_decode_num_accepted_tokens
    rate = stats.spec_decode_num_accepted_tokens / stats.spec_decode_num_draft_tokens
    assert m["jaxpaged:spec_decode_draft_acceptance_rate"] == pytest.approx(rate)
    assert m["jaxpaged:spec_decode_mean_acceptance_length"] == pytest.approx(
        1 + stats.spec_decode_num_accepted_tokens / stats.spec_decode_num_drafts)


def test_structured_output_rows_masked_after_their_drafts(pair):
    from jaxpaged.sampling_params import StructuredOutputsParams as SO
    base, spec = pair
    prompts = _prompts(base.get_tokenizer())[:3]
    schema = {"type": "object", "properties": {"a": {"type": "array", "items": {"enum": ["xy", "zw"]},
                                                     "maxItems": 6}}, "required": ["a"]}
    for so in (SO(regex=r"(hello ){2,6}world!"), SO(json=schema)):
        before = spec.llm_engine.get_stats().spec_decode_num_accepted_tokens
        params = SamplingParams(temperature=0.0, max_tokens=40, structured_outputs=so)
        a, _ = _same(base, spec, prompts, params)
        if so.regex:
            assert all(re.fullmatch(so.regex, o.outputs[0].text) for o in a)
        assert spec.llm_engine.get_stats().spec_decode_num_accepted_tokens > before


def test_verification_rows_equal_to_seq_bucket(tiny_llama, tmp_path_factory, pair):
    """T = B = 16 with 10 sequences: R = min(T, B * (1 + k)) = B; the verification variant must still
    be the one that runs (it reads R real rows, not one per sequence)."""
    base, _ = pair
    spec = make_llm(tiny_llama, tmp_path_factory, speculative_config=NGRAM, max_model_len=128, block_size=8,
                    max_num_seqs=16, max_num_batched_tokens=16)
    tok = base.get_tokenizer()
    prompts = [tok.encode("Hello world! Hello world! Hello")] * 5 + [tok.encode(TEXT[i: i + 14]) for i in range(5)]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    _same(base, spec, prompts, params)
    assert spec.llm_engine.get_stats().spec_decode_num_accepted_tokens > 0


def test_server_speculates_and_exports_metrics(tiny_llama, pair):
    import httpx

    from tests.server_utils import ServerProcess, wait_for
    base, _ = pair
    prompt = TEXT[:160]
    expected = base.generate([prompt], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True),
                             use_tqdm=False)[0].outputs[0].text
    proc = ServerProcess(["--model", tiny_llama, "--enforce-eager", "--max-model-len", "256", "--block-size", "8",
                          "--max-num-seqs", "8", "--max-num-batched-tokens", "64", "--speculative-config",
                          '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, '
                          '"prompt_lookup_min": 1}'])
    try:
        body = {"model": tiny_llama, "prompt": prompt, "max_tokens": 24, "temperature": 0.0, "ignore_eos": True}
        r = httpx.post(proc.url + "/v1/completions", json=body, timeout=120)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected
        # the engine thread refreshes the metrics after the step that produced the answer
        wait_for(lambda: proc.metrics()["jaxpaged:spec_decode_num_accepted_tokens_total"] > 0, 60,
                 what="spec_decode metrics")
        assert 0 < proc.metrics()["jaxpaged:spec_decode_draft_acceptance_rate"] <= 1
    finally:
        proc.stop()
