"""Speculative decoding with a draft model (speculative_config {"model": ..., "num_speculative_tokens": k}):
the draft runs over its own paged KV pool; outputs equal the non-speculative engine's; both pools end free."""
import numpy as np
import pytest

from jaxpaged import SamplingParams
from tests.engine_utils import make_llm
from tests.tiny_models import TEXT

ENGINE = dict(max_model_len=256, block_size=8, max_num_seqs=8, max_num_batched_tokens=64)


@pytest.fixture(scope="module")
def engines(tiny_llama, tiny_model_factory, tmp_path_factory):
    gpt2 = tiny_model_factory("gpt2")                      # another family, the same tokenizer and vocabulary
    base = make_llm(tiny_llama, tmp_path_factory, **ENGINE)
    self_draft = make_llm(tiny_llama, tmp_path_factory, **ENGINE,
                          speculative_config={"model": tiny_llama, "num_speculative_tokens": 3})
    other_draft = make_llm(tiny_llama, tmp_path_factory, **ENGINE,
                           speculative_config={"model": gpt2, "num_speculative_tokens": 2})
    return base, self_draft, other_draft


def _prompts(tok):
    rng = np.random.default_rng(1)
    return [tok.encode(TEXT[:120]), tok.encode("Hello world! Hello")] + \
        [rng.integers(3, 320, int(n)).tolist() for n in (3, 70)]


def _check_same(base, spec, prompts, params):
    a = base.generate(prompts, params, use_tqdm=False)
    b = spec.generate(prompts, params, use_tqdm=False)
    assert [[(c.token_ids, c.text, c.finish_reason) for c in o.outputs] for o in a] == \
        [[(c.token_ids, c.text, c.finish_reason) for c in o.outputs] for o in b]
    engine = spec.llm_engine
    for bm in (engine.scheduler.block_manager, engine.speculator.draft.block_manager):
        assert bm.num_free_blocks == bm.num_total_blocks
        bm.check_invariants()
    return b


def test_draft_equal_to_target_accepts_every_greedy_draft(engines):
    base, spec, _ = engines
    outs = _check_same(base, spec, _prompts(base.get_tokenizer()),
                       SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))
    for o in outs:
        m = o.metrics
        assert m.spec_num_drafts > 0 and m.spec_num_accepted_tokens == m.spec_num_draft_tokens
    # sampled: the draft's greedy proposal is a point mass, so seeded outputs equal the target's own
    _check_same(base, spec, _prompts(base.get_tokenizer()),
                SamplingParams(temperature=0.9, top_p=0.9, seed=11, max_tokens=20, ignore_eos=True))


def test_other_family_draft_identical_with_stops_penalties_logprobs(engines):
    base, _, spec = engines
    prompts = _prompts(base.get_tokenizer())
    for params in (SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True),
                   SamplingParams(temperature=0.0, max_tokens=20, min_tokens=5, logprobs=2, stop=["e"]),
                   SamplingParams(temperature=0.0, max_tokens=20, repetition_penalty=1.2, presence_penalty=0.3,
                                  ignore_eos=True)):
        _check_same(base, spec, prompts, params)
    assert spec.llm_engine.get_stats().spec_decode_num_drafts > 0


def test_abort_frees_both_pools(engines):
    _, spec, _ = engines
    engine = spec.llm_engine
    prompt = spec.get_tokenizer().encode(TEXT[:120])
    engine.add_request("x", prompt, SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True))
    for _ in range(4):
        engine.step()
    assert engine.speculator.draft.block_manager.num_used_blocks > 0
    engine.abort_request("x")
    engine.step()                                   # nothing runs; the draft's table of "x" goes back
    for bm in (engine.scheduler.block_manager, engine.speculator.draft.block_manager):
        assert bm.num_free_blocks == bm.num_total_blocks


def test_draft_with_another_vocabulary_is_rejected(tiny_llama, tiny_model_factory, tmp_path_factory):
    other = tiny_model_factory("llama", vocab_size=300)
    with pytest.raises(ValueError, match=r"speculative_config\.model: the draft's vocabulary has 300 tokens"):
        make_llm(tiny_llama, tmp_path_factory, **ENGINE,
                 speculative_config={"model": other, "num_speculative_tokens": 2})
