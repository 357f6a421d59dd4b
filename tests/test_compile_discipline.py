"""Compile discipline: warmup() compiles the bucket table; a mixed workload afterwards compiles nothing."""
import numpy as np
import pytest

from jaxpaged import LLM, SamplingParams
from jaxpaged.buckets import BucketError, BucketTable


def test_bucket_table_lookup_and_out_of_table_raises():
    table = BucketTable.build(max_num_batched_tokens=64, max_num_seqs=32)
    assert table.token_buckets == (16, 32, 64) and table.seq_buckets == (4, 8, 16, 32)
    assert table.lookup(1, 1) == (16, 4)
    assert table.lookup(17, 5) == (32, 8)
    assert table.lookup(20, 20) == (32, 32)                # a decode step of 20 sequences
    assert all(b <= t for t, b in table.pairs())
    with pytest.raises(BucketError):
        table.lookup(65, 1)
    with pytest.raises(BucketError):
        table.lookup(10, 33)


def test_mixed_workload_after_warmup_compiles_nothing(tiny_llama, tmp_path):
    llm = LLM(tiny_llama, max_model_len=128, block_size=8, max_num_seqs=8, max_num_batched_tokens=64,
              download_dir=str(tmp_path))
    runner = llm.llm_engine.runner
    compiled = runner.num_compiled()
    assert compiled == len(runner.buckets.pairs()) + len(runner.buckets.seq_buckets)
    rng = np.random.default_rng(0)
    prompts, params = [], []
    for i in range(100):
        prompts.append(rng.integers(3, 320, int(rng.integers(1, 90))).tolist())
        params.append(SamplingParams(temperature=float(rng.choice([0.0, 0.7, 1.0])), top_p=float(rng.choice([1.0, 0.9])),
                                     top_k=int(rng.choice([0, 5])), seed=int(rng.integers(0, 5)) if i % 3 else None,
                                     max_tokens=int(rng.integers(1, 30)), min_tokens=int(rng.integers(0, 2)),
                                     ignore_eos=bool(i % 2)))
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) >= 1 for o in outs] == [True] * 100
    assert runner.num_compiled() == compiled
    assert llm.llm_engine.get_stats().kv_cache_usage == 0.0


def test_background_warmup_serves_at_once_and_compiles_the_rest(tiny_llama, tmp_path):
    """The server's start (LLMEngine(background_warmup=True)): the smallest shape is compiled before the
    constructor returns, the rest in a thread while requests run (a shape it has not reached compiles
    at its step); the tokens are those of a fully warmed engine, and afterwards the table is complete."""
    from jaxpaged.engine import LLMEngine
    from jaxpaged.engine_config import EngineConfig

    kw = dict(max_model_len=128, block_size=8, max_num_seqs=8, max_num_batched_tokens=64, download_dir=str(tmp_path))
    greedy = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    prompts = [list(range(3, 3 + n)) for n in (2, 20, 50)]
    want = [o.outputs[0].token_ids for o in LLM(tiny_llama, **kw).generate(prompts, greedy, use_tqdm=False)]

    engine = LLMEngine(EngineConfig(model=tiny_llama, **kw), progress=False, background_warmup=True)
    runner = engine.runner
    full = len(runner.buckets.pairs()) + len(runner.buckets.seq_buckets)
    assert engine.warmup_thread is not None and runner.num_compiled() >= 2
    for i, p in enumerate(prompts):
        engine.add_request(str(i), {"prompt_token_ids": p}, greedy)
    got = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                got[out.request_id] = out.outputs[0].token_ids
    assert [got[str(i)] for i in range(len(prompts))] == want
    engine.warmup_thread.join(300)
    assert not engine.warmup_thread.is_alive() and runner.num_compiled() == full and engine.warmup_done.is_set()
    engine.stop_warmup()                    # after the end: nothing to stop, returns at once
    # the server then loads transformers' tokenizer for chat templates (the entry's tokenizer is a CachedTokenizer)
    from jaxpaged.server.__main__ import _preload_chat_tokenizer
    from jaxpaged.tokenizer import CachedTokenizer
    assert isinstance(engine.tokenizer, CachedTokenizer) and engine.tokenizer._hf is None
    _preload_chat_tokenizer(engine)
    assert engine.tokenizer._hf is not None


def test_background_warmup_stops_when_asked(tiny_llama, tmp_path):
    from jaxpaged.engine import LLMEngine
    from jaxpaged.engine_config import EngineConfig

    engine = LLMEngine(EngineConfig(model=tiny_llama, max_model_len=128, block_size=8, max_num_seqs=8,
                                    max_num_batched_tokens=64, download_dir=str(tmp_path)),
                       progress=False, background_warmup=True)
    engine.stop_warmup()
    assert not engine.warmup_thread.is_alive()
    assert engine.warmup_done.is_set() == (engine.runner.num_compiled() == len(engine.runner.buckets.pairs())
                                           + len(engine.runner.buckets.seq_buckets))
    out = engine.runner.num_compiled()
    assert 2 <= out <= len(engine.runner.buckets.pairs()) + len(engine.runner.buckets.seq_buckets)
