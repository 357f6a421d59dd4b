"""Beam search inside the engine (jaxpaged/beam_search.py) on the tiny llama: equal to transformers'
num_beams search with eos disabled, eos handling against a reference of vLLM's algorithm on transformers'
logits, KV blocks shared between beams (peak counted), nothing leaked, KV-pool pressure, bad input.

Shapes are chosen so the module engine compiles only a few (T, B) buckets: every call's prompts are
prefilled together (33..64 tokens, at most 4 sequences) and its beams decode as 8 sequences.
"""
import numpy as np
import pytest
import torch

import jaxpaged.beam_search as beam_search_module
from jaxpaged import BeamSearchParams
from tests.engine_utils import make_llm
from tests.hf_reference import hf_logprobs, hf_model

EOS = 2


def _prompts(lens, seed):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 320, k).tolist() for k in lens]


def _engine(path, tmp_path_factory, **kw):
    return make_llm(path, tmp_path_factory, **{**dict(max_model_len=128, max_num_seqs=8, max_num_batched_tokens=64), **kw})


@pytest.fixture(scope="module")
def llm(tiny_llama, tmp_path_factory):
    return _engine(tiny_llama, tmp_path_factory)


def _used_blocks(llm):
    bm = llm.llm_engine.scheduler.block_manager
    return bm.num_total_blocks - bm.num_free_blocks


def hf_beam_search(prompt, width, max_new, length_penalty, early_stopping):
    """transformers' num_beams search with eos disabled: [(tokens, cum_logprob)] best first."""
    ids = torch.tensor([prompt], dtype=torch.long)
    with torch.no_grad():
        out = hf_model("llama").generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, num_beams=width,
            num_return_sequences=width, max_new_tokens=max_new, early_stopping=early_stopping,
            length_penalty=length_penalty, pad_token_id=0, eos_token_id=None,
            output_scores=True, return_dict_in_generate=True)
    # sequences_scores = cum_logprob / generated_len ** length_penalty (every beam has max_new tokens)
    cums = (out.sequences_scores * max_new ** length_penalty).tolist()
    return list(zip(out.sequences.tolist(), cums))


@pytest.mark.parametrize("width,length_penalty,early_stopping", [(2, 1.0, False), (4, 0.5, True)])
def test_equals_transformers_num_beams(llm, width, length_penalty, early_stopping):
    n_new = 10
    # 8 beams in all: 4 prompts at width 2, 2 prompts at width 4; given as ids and as dicts
    prompts = _prompts((1, 9, 17, 33), seed=width)[-8 // width:]
    inputs = [p if i % 2 else {"prompt_token_ids": p} for i, p in enumerate(prompts)]
    params = BeamSearchParams(beam_width=width, max_tokens=n_new, length_penalty=length_penalty,
                              ignore_eos=True)
    outs = llm.beam_search(inputs, params)
    tok = llm.get_tokenizer()
    assert len(outs) == len(prompts)
    for prompt, out in zip(prompts, outs):
        want = hf_beam_search(prompt, width, n_new, length_penalty, early_stopping)
        got = out.sequences
        assert [s.tokens for s in got] == [w[0] for w in want]          # prompt + generated, best first
        np.testing.assert_allclose([s.cum_logprob for s in got], [w[1] for w in want], atol=2e-3)
        for s in got:
            assert s.text == tok.decode(s.tokens)
            assert s.finish_reason == "length" and len(s.logprobs) == n_new
            # each logprobs entry holds the chosen token first, then the beam's other candidates
            assert list(s.logprobs[0])[0] == s.tokens[len(prompt)]
            assert len(s.logprobs[0]) == 2 * width
    assert _used_blocks(llm) == 0 and not llm.llm_engine.scheduler.has_unfinished_sequences()


def test_beams_share_kv_blocks(llm, monkeypatch):
    width, n_new, bs = 4, 12, 16
    prompts = _prompts((37, 21), seed=2)
    sched = llm.llm_engine.scheduler
    peak = [0]
    schedule = sched.schedule

    def counting_schedule():
        out = schedule()
        peak[0] = max(peak[0], _used_blocks(llm))
        return out

    monkeypatch.setattr(sched, "schedule", counting_schedule)
    outs = llm.beam_search(prompts, BeamSearchParams(beam_width=width, max_tokens=n_new, ignore_eos=True))
    assert all(len(o.sequences) == width for o in outs)
    # the KV cache holds prompt + n_new - 1 tokens per beam (the last token is never computed)
    lens = [len(p) + n_new - 1 for p in prompts]                      # 48 and 32: block-aligned ends
    independent = sum(width * -(-n // bs) for n in lens)               # 4*3 + 4*2 = 20
    # shared: the prompt's full blocks once, then one block of its own per beam
    shared = sum(len(p) // bs + width * (-(-n // bs) - len(p) // bs) for p, n in zip(prompts, lens))
    assert (independent, shared) == (20, 11)
    assert peak[0] == shared
    assert _used_blocks(llm) == 0


def reference_beam_search(prompt, width, max_new, length_penalty, ignore_eos):
    """vLLM's algorithm on transformers' logprobs (one full forward per beam and step, float64):
    [(tokens, cum_logprob, finish_reason)] best first."""
    beams, finished = [(list(prompt), 0.0)], []
    for _ in range(max_new):
        cands = []
        for toks, cum in beams:
            lp = hf_logprobs(hf_model("llama"), toks)[-1]
            for t in np.argsort(-lp, kind="stable")[:2 * width]:
                seq = (toks + [int(t)], cum + float(lp[t]))
                (finished.append(seq + ("stop",)) if t == EOS and not ignore_eos else cands.append(seq))
        beams = sorted(cands, key=lambda c: -c[1])[:width]
    finished += [b + ("length",) for b in beams]

    def score(s):
        n = len(s[0]) - (s[2] == "stop")
        return s[1] / n ** length_penalty

    return sorted(finished, key=score, reverse=True)[:width]


@pytest.mark.parametrize("length_penalty", [1.0, 0.0])
def test_eos_finishes_beams_like_vllm(llm, length_penalty):
    width, n_new = 2, 8
    tok = llm.get_tokenizer()
    # the first two prompts make eos the most likely next token at some steps (found by search)
    prompts = [[198, 245, 124, 149, 319, 258, 313, 123, 220], [14, 277, 132, 21, 154, 123],
               _prompts((28,), seed=3)[0], "The capital of France is"]
    params = BeamSearchParams(beam_width=width, max_tokens=n_new, length_penalty=length_penalty)
    outs = llm.beam_search(prompts, params)
    reasons = []
    for prompt, out in zip(prompts, outs):
        ids = tok.encode(prompt) if isinstance(prompt, str) else prompt
        want = reference_beam_search(ids, width, n_new, length_penalty, ignore_eos=False)
        got = out.sequences
        assert [(s.tokens, s.finish_reason) for s in got] == [(w[0], w[2]) for w in want]
        np.testing.assert_allclose([s.cum_logprob for s in got], [w[1] for w in want], atol=2e-3)
        for s in got:
            reasons.append(s.finish_reason)
            if s.finish_reason == "stop":
                assert s.tokens[-1] == EOS and s.stop_reason == EOS
                assert s.text == tok.decode(s.tokens[:-1])              # eos left out of the text
            else:
                assert len(s.tokens) == len(ids) + n_new
        if isinstance(prompt, str):
            assert all(s.text.startswith(prompt) for s in got)
    assert "stop" in reasons and "length" in reasons                     # both paths were taken
    assert _used_blocks(llm) == 0


def test_kv_pool_pressure_gives_the_same_beams(tiny_llama, tmp_path_factory, monkeypatch):
    # 6 usable blocks of 8 tokens; 4 beams of 23 cached tokens need 3 blocks each, 9 in all when they
    # share the prompt's full block: beams get preempted and recompute, and beams waiting for their
    # siblings give their blocks back. Prompt and decode steps fit the one (16, 4) bucket.
    llm = _engine(tiny_llama, tmp_path_factory, block_size=8, num_kv_blocks=7, max_num_seqs=4,
                  max_num_batched_tokens=16)
    prompt = _prompts((12,), seed=4)[0]
    released = []
    release = beam_search_module.BeamSearchState.release_waiting_parents
    monkeypatch.setattr(beam_search_module.BeamSearchState, "release_waiting_parents",
                        lambda self, scheduler: released.append(1) or release(self, scheduler))
    out = llm.beam_search([prompt], BeamSearchParams(beam_width=4, max_tokens=12, ignore_eos=True))[0]
    want = hf_beam_search(prompt, 4, 12, 1.0, False)
    assert [s.tokens for s in out.sequences] == [w[0] for w in want]
    stats = llm.llm_engine.get_stats()
    assert stats.num_preemptions > 0 and released
    assert stats.num_free_blocks == stats.num_total_blocks == 6


def test_bad_input_names_the_field(llm):
    for kwargs, field in [(dict(beam_width=0, max_tokens=4), "beam_width"),
                          (dict(beam_width=2, max_tokens=0), "max_tokens"),
                          (dict(beam_width=2, max_tokens=4, length_penalty=float("inf")), "length_penalty"),
                          (dict(beam_width=2, max_tokens=4, temperature=-1.0), "temperature"),
                          (dict(beam_width=2.5, max_tokens=4), "beam_width")]:
        with pytest.raises(ValueError, match=field):
            BeamSearchParams(**kwargs)
    # 2 * beam_width candidates must fit max_logprobs (20); beam_width must fit max_num_seqs (8)
    for width in (11, 9):
        with pytest.raises(ValueError, match="beam_width"):
            llm.beam_search([[5, 6, 7]], BeamSearchParams(beam_width=width, max_tokens=4))
    with pytest.raises(ValueError, match="params"):
        llm.beam_search([[5, 6, 7]], dict(beam_width=2, max_tokens=4))
    with pytest.raises(ValueError, match="prompt"):
        llm.beam_search([[5, 6, 7], []], BeamSearchParams(beam_width=2, max_tokens=4))
    with pytest.raises(ValueError, match="prompt"):
        llm.beam_search([[5, 6, 7], [1] * 200], BeamSearchParams(beam_width=2, max_tokens=4))
    assert _used_blocks(llm) == 0 and not llm.llm_engine.scheduler.has_unfinished_sequences()


def test_runs_while_other_requests_are_in_flight(llm):
    """A beam search shares the engine's steps with ordinary requests: same beams as on an idle engine,
    the other requests' outputs as when run alone, and no block left in use."""
    from jaxpaged import SamplingParams
    engine = llm.llm_engine
    prompts = _prompts((21, 9), seed=6)
    params = BeamSearchParams(beam_width=2, max_tokens=6, ignore_eos=True)
    idle = llm.beam_search(prompts, params)
    others = _prompts((14, 30), seed=7)
    greedy = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    alone = [o.outputs[0].token_ids for o in llm.generate(others, greedy, use_tqdm=False)]
    # two ordinary requests already running when the beam searches join, beams finishing first
    for i, p in enumerate(others):
        engine.add_request(f"other{i}", p, greedy)
    engine.step()
    for i, p in enumerate(prompts):          # the same input path as generate: numpy prompts too
        engine.add_request(f"beam{i}", np.array(p) if i else p, params)
    assert engine.get_num_unfinished_requests() == 4
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    busy = [beam_search_module.to_beam_search_output(done[f"beam{i}"], llm.get_tokenizer(), params)
            for i in range(len(prompts))]
    for a, b in zip(idle, busy):
        assert [s.tokens for s in a.sequences] == [s.tokens for s in b.sequences]
        np.testing.assert_allclose([s.cum_logprob for s in a.sequences], [s.cum_logprob for s in b.sequences],
                                   atol=1e-4)
    assert [done[f"other{i}"].outputs[0].token_ids for i in range(len(others))] == alone
    assert _used_blocks(llm) == 0 and not engine.scheduler.has_unfinished_sequences()


def test_an_error_mid_search_frees_every_block(llm, monkeypatch):
    runner = llm.llm_engine.runner
    execute, calls = runner.execute, []

    def failing_execute(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return execute(*args, **kwargs)

    monkeypatch.setattr(runner, "execute", failing_execute)
    with pytest.raises(KeyboardInterrupt):
        llm.beam_search(_prompts((40, 20), seed=5), BeamSearchParams(beam_width=4, max_tokens=8))
    assert _used_blocks(llm) == 0 and not llm.llm_engine.scheduler.has_unfinished_sequences()
