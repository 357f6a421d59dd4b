"""Multi-LoRA serving (jaxpaged/lora): PEFT adapters batched with base rows, exact against transformers + peft.

Tiny random models (tests/tiny_models.py) with random, non-zero PEFT adapters (tests/lora_utils.py).
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from jaxpaged import LLM, LoRARequest, SamplingParams
from jaxpaged.lora.peft_loader import load_peft_adapter
from jaxpaged.lora.slots import SlotLRU
from tests.lora_utils import make_adapter, peft_greedy

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PROMPTS = [[5, 6, 7, 8], [9, 10, 11], list(range(20, 40)), [3, 4], [50, 51, 52, 53, 54, 55, 56], [7] * 9]
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def llama_setup(tiny_model_factory, tmp_path_factory):
    """A tiny llama (the unusual head count 2 KV of 4 heads), three adapters of different ranks and targets."""
    model = tiny_model_factory("llama")
    d = tmp_path_factory.mktemp("llama-loras")
    adapters = {
        "all8": make_adapter(model, str(d / "all8"), r=8, alpha=16, targets=LLAMA_TARGETS, seed=1),
        "qv4": make_adapter(model, str(d / "qv4"), r=4, alpha=8, targets=("q_proj", "v_proj"), seed=2,
                            use_rslora=True),
        "mlp2": make_adapter(model, str(d / "mlp2"), r=2, alpha=4, targets=("gate_proj", "down_proj"), seed=3,
                             rank_pattern={"down_proj": 6}, alpha_pattern={"down_proj": 3}),
    }
    llm = LLM(model, enable_lora=True, max_loras=2, max_lora_rank=8, enforce_eager=True, max_model_len=128,
              max_num_seqs=8, max_num_batched_tokens=64, download_dir=str(d / "cache"))
    return model, adapters, llm


def _requests(adapters: dict) -> dict:
    return {name: LoRARequest(name, i + 1, path) for i, (name, path) in enumerate(adapters.items())}


def test_llama_mixed_batch_equals_peft_and_never_recompiles(llama_setup):
    model, adapters, llm = llama_setup
    reqs = _requests(adapters)
    # three adapters and base rows in one call with two slots: adapters wait for a slot, get evicted, return
    loras = [reqs["all8"], None, reqs["qv4"], reqs["mlp2"], reqs["all8"], None]
    outs = llm.generate(PROMPTS, GREEDY, lora_request=loras, use_tqdm=False)
    expected = [peft_greedy(model, r.lora_path if r else None, p, 6) for p, r in zip(PROMPTS, loras)]
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert [o.lora_request for o in outs] == loras
    base = [peft_greedy(model, None, p, 6) for p in PROMPTS]
    assert expected[0] != base[0] and expected[2] != base[2] and expected[3] != base[3]   # adapters matter
    runner = llm.llm_engine.runner
    assert runner.lora.lru.num_evictions >= 1
    compiled, set_compiled = runner.num_compiled(), runner.lora.num_compiled()
    assert set_compiled == 1
    # other adapters on the same shapes: slot contents change, nothing compiles
    shuffled = [reqs["mlp2"], reqs["qv4"], None, reqs["all8"], reqs["qv4"], reqs["mlp2"]]
    outs = llm.generate(PROMPTS, GREEDY, lora_request=shuffled, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [
        peft_greedy(model, r.lora_path if r else None, p, 6) for p, r in zip(PROMPTS, shuffled)]
    assert (runner.num_compiled(), runner.lora.num_compiled()) == (compiled, set_compiled)


def test_prefix_cache_is_keyed_by_adapter(llama_setup):
    _, adapters, llm = llama_setup
    reqs = _requests(adapters)
    prompt = [int(x) for x in np.arange(40) * 7 % 300 + 3]       # 40 tokens: 2 full blocks of 16
    one = SamplingParams(temperature=0.0, max_tokens=1)
    bm = llm.llm_engine.scheduler.block_manager

    def cached(lora):
        return llm.generate([prompt], one, lora_request=lora, use_tqdm=False)[0].num_cached_tokens

    assert cached(reqs["qv4"]) == 0
    before = bm.num_cached_blocks
    assert cached(reqs["qv4"]) == 32                  # same adapter: both full blocks reused
    assert cached(reqs["mlp2"]) == 0                  # another adapter never shares the prompt's K/V
    assert cached(None) == 0                          # nor does the base model
    assert bm.num_cached_blocks == before + 4         # 2 more blocks each for mlp2 and the base
    assert cached(None) == 32


def test_llm_lora_errors(llama_setup, tmp_path):
    model, adapters, llm = llama_setup
    with pytest.raises(ValueError, match="lora_int_id"):
        LoRARequest("x", 0, adapters["qv4"])
    with pytest.raises(ValueError, match="lora_request: got 1 for 2 prompts"):
        llm.generate([[1, 2], [3, 4]], GREEDY, lora_request=[LoRARequest("qv4", 2, adapters["qv4"])])
    with pytest.raises(ValueError, match="lora_int_id: 2 is already loaded"):
        llm.generate([[1, 2]], GREEDY, lora_request=LoRARequest("other", 2, adapters["all8"]))
    with pytest.raises(ValueError, match="lora_path"):
        llm.generate([[1, 2]], GREEDY, lora_request=LoRARequest("nope", 9, str(tmp_path / "missing")))
    engine = llm.llm_engine
    assert not engine.has_unfinished_requests() and engine.scheduler.block_manager.num_used_blocks == 0


def test_readded_adapter_gets_a_fresh_prefix_chain(llama_setup):
    _, adapters, llm = llama_setup
    engine = llm.llm_engine
    prompt = list(range(60, 100))
    one = SamplingParams(temperature=0.0, max_tokens=1)
    req = LoRARequest("swap", 7, adapters["all8"])
    assert llm.generate([prompt], one, lora_request=req, use_tqdm=False)[0].num_cached_tokens == 0
    assert engine.remove_lora(7) and 7 not in engine.list_loras()
    # the same id now names other weights: the old K/V must not be served for it
    req = LoRARequest("swap", 7, adapters["qv4"])
    assert llm.generate([prompt], one, lora_request=req, use_tqdm=False)[0].num_cached_tokens == 0
    assert engine.remove_lora(7) and not engine.remove_lora(7)


def test_gpt2_mixed_batch_equals_peft(tiny_model_factory, tmp_path):
    model = tiny_model_factory("gpt2")
    # "c_proj" is both attn.c_proj and mlp.c_proj, as in PEFT
    a = make_adapter(model, str(tmp_path / "a"), r=8, alpha=16, targets=("c_attn", "c_proj", "c_fc"), seed=4)
    b = make_adapter(model, str(tmp_path / "b"), r=3, alpha=5, targets=("c_attn",), seed=5)
    llm = LLM(model, enable_lora=True, max_loras=2, max_lora_rank=8, enforce_eager=True, max_model_len=128,
              max_num_seqs=8, max_num_batched_tokens=64, download_dir=str(tmp_path / "cache"))
    loras = [LoRARequest("a", 1, a), None, LoRARequest("b", 2, b), LoRARequest("a", 1, a)]
    outs = llm.generate(PROMPTS[:4], GREEDY, lora_request=loras, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [
        peft_greedy(model, r.lora_path if r else None, p, 6) for p, r in zip(PROMPTS[:4], loras)]


def test_lora_needs_enable_lora(tiny_model_factory, tmp_path):
    llm = LLM(tiny_model_factory("llama"), enforce_eager=True, max_model_len=64, max_num_seqs=4,
              max_num_batched_tokens=32, download_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="enable_lora=True"):
        llm.generate([[1, 2]], GREEDY, lora_request=LoRARequest("a", 1, str(tmp_path)))
    assert llm.llm_engine.runner.lora is None


def test_slot_lru_evicts_least_recent_unpinned():
    lru = SlotLRU(2)
    assert lru.acquire(10, {10}) == (1, True)
    assert lru.acquire(11, {11}) == (2, True)
    assert lru.acquire(10, {10}) == (1, False)          # resident: no load, now most recent
    assert lru.acquire(12, {12}) == (2, True)           # evicts 11, the least recently used
    with pytest.raises(RuntimeError, match="max_loras"):
        lru.acquire(13, {10, 12, 13})                   # both residents pinned by this step
    assert (lru.num_loads, lru.num_evictions) == (3, 1)


@pytest.mark.parametrize("kind, targets, column, row", [
    # one KV head: k/v columns (and their B) replicated at TP=2
    ("llama_tied", LLAMA_TARGETS, ("layers/k_proj", 64, 32), ("layers/down_proj", 128, 64)),
    # c_attn's columns regrouped per shard (and its B)
    ("gpt2", ("c_attn", "c_proj", "c_fc"), ("layers/qkv", 64, 192), ("layers/attn_out", 64, 64)),
])
def test_tensor_parallel_lora_equals_peft(tiny_model_factory, tmp_path, kind, targets, column, row):
    from tests.test_tensor_parallel import run_worker
    model = tiny_model_factory(kind)
    a = make_adapter(model, str(tmp_path / "a"), r=8, alpha=16, targets=targets, seed=21)
    b = make_adapter(model, str(tmp_path / "b"), r=4, alpha=4, targets=targets[:1], seed=22)
    prompts = PROMPTS[:3]
    out = run_worker(tmp_path, kind, devices=2, model=model, tps=[2], prompts=prompts, max_tokens=6,
                     loras=[["a", 1, a], ["b", 2, b]], lora_of_prompt=[0, None, 1], max_lora_rank=8)
    # TP=1 equals transformers + peft (the tests above), so TP=2 is checked against peft directly
    assert out["tokens"]["2"] == [peft_greedy(model, path, p, 6) for p, path in zip(prompts, (a, None, b))]
    shards = out["lora_shards"]["2"]
    path, d_in, d_out = column                # column-parallel: B split on out, A whole
    assert shards[path] == [[[2, 2, d_in, 8]] * 2, [[2, 2, 8, d_out // 2]] * 2]
    path, d_in, d_out = row                   # row-parallel: A split on in, B whole
    assert shards[path] == [[[2, 2, d_in // 2, 8]] * 2, [[2, 2, 8, d_out]] * 2]


def test_bench_lora_runs_on_a_tiny_setting(tiny_llama, tmp_path, capsys):
    from jaxpaged.bench.__main__ import main
    out_json = tmp_path / "lora.jsonl"
    main(["lora", "--model", tiny_llama, "--num-prompts", "4", "--input-len-range", "4:12", "--output-len-range",
          "2:4", "--ranks", "4", "--adapters", "0,2", "--ignore-eos", "--enforce-eager", "--max-num-seqs", "4",
          "--max-num-batched-tokens", "32", "--max-model-len", "64", "--download-dir", str(tmp_path / "c"),
          "--output-json", str(out_json)])
    rows = [json.loads(line) for line in out_json.read_text().splitlines()]
    # one LoRA engine per rank serves every adapter count, with max_loras = the largest count
    assert [(r["case"], r["rank"], r["adapters"]) for r in rows] == [("base", 0, 0), ("lora", 4, 0), ("lora", 4, 2)]
    assert [r["max_loras"] for r in rows[1:]] == [2, 2] and rows[1]["slot_loads"] == 0
    rows = [rows[0], rows[2]]
    from jaxpaged.config import ModelConfig
    from jaxpaged.lora.device import stack_bytes
    cfg = ModelConfig.from_hf_config(json.loads(open(os.path.join(tiny_llama, "config.json")).read()))
    assert stack_bytes(cfg, 2, 4, np.float32) == 2 * rows[1]["slot_bytes"]    # what the KV pool is sized after
    assert rows[1]["slot_loads"] == 2 and rows[1]["output_tokens"] == rows[0]["output_tokens"]
    # a slot holds every decoder Linear of 2 layers at rank 4 in f32: 4 * 2 * 4 * sum(in + out)
    assert rows[1]["slot_bytes"] == 4 * 2 * 4 * ((64 + 64) * 2 + (64 + 32) * 2 + (64 + 128) * 3)
    assert "adapter slot" in capsys.readouterr().out


def test_lora_with_ngram_speculative_decoding_equals_peft(llama_setup, tmp_path):
    """Drafted rows carry their sequence's adapter slot; accepted tokens hash under the adapter's root."""
    model, adapters, _ = llama_setup
    llm = LLM(model, enable_lora=True, max_loras=2, max_lora_rank=8, enforce_eager=True, max_model_len=128,
              max_num_seqs=4, max_num_batched_tokens=64, download_dir=str(tmp_path / "cache"),
              speculative_config={"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 2})
    reqs = _requests(adapters)
    prompts = [[7, 8, 9] * 6, [11, 12] * 8, [7, 8, 9] * 6]      # repetitive: the n-gram proposer drafts
    loras = [reqs["all8"], reqs["qv4"], None]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    outs = llm.generate(prompts, params, lora_request=loras, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [
        peft_greedy(model, r.lora_path if r else None, p, 12) for p, r in zip(prompts, loras)]
    assert sum(o.metrics.spec_num_accepted_tokens for o in outs) > 0      # drafts were verified and kept


def test_adapter_removed_mid_request_finishes_with_it(llama_setup):
    model, adapters, llm = llama_setup
    engine = llm.llm_engine
    req = LoRARequest("leaving", 8, adapters["mlp2"])
    engine.add_request("leaving-0", PROMPTS[4], GREEDY, lora_request=req)
    engine.step()                                   # prefill with the adapter
    stats = engine.get_stats()
    assert (stats.max_lora, stats.running_lora_adapters, stats.waiting_lora_adapters) == (2, "leaving", "")
    assert engine.remove_lora(8)                    # new requests can no longer name it ...
    outs = []
    while engine.has_unfinished_requests():
        outs += [o for o in engine.step() if o.finished]
    assert outs[0].outputs[0].token_ids == peft_greedy(model, adapters["mlp2"], PROMPTS[4], 6)   # ... this one keeps it
    assert engine.scheduler.block_manager.num_used_blocks == 0


def test_beam_search_with_an_adapter_equals_peft_num_beams(llama_setup):
    import torch
    from jaxpaged import BeamSearchParams
    from tests.lora_utils import _peft_model
    model, adapters, llm = llama_setup
    prompt, width, n_new = [5, 9, 13, 17], 2, 6
    outs = llm.beam_search([prompt], BeamSearchParams(beam_width=width, max_tokens=n_new, ignore_eos=True),
                           lora_request=LoRARequest("all8", 1, adapters["all8"]))
    ids = torch.tensor([prompt])

    def hf_beams(adapter):
        with torch.no_grad():
            return _peft_model(model, adapter).generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, num_beams=width,
                num_return_sequences=width, max_new_tokens=n_new, pad_token_id=0, eos_token_id=None).tolist()
    want = hf_beams(adapters["all8"])
    assert [s.tokens for s in outs[0].sequences] == want and want != hf_beams(None)


def test_after_warmup_adapters_compile_nothing(llama_setup, tmp_path):
    model, adapters, _ = llama_setup
    llm = LLM(model, enable_lora=True, max_loras=2, max_lora_rank=8, max_model_len=32,
              max_num_seqs=4, max_num_batched_tokens=16, download_dir=str(tmp_path / "cache"))
    runner = llm.llm_engine.runner
    assert runner.lora.num_compiled() == 1 and not runner.lora.stacks["layers/q_proj"][0].any()
    assert runner.lora.lru.resident() == []
    compiled = runner.num_compiled()
    reqs = _requests(adapters)
    loras = [reqs["all8"], None, reqs["qv4"], reqs["mlp2"]]       # three adapters through two slots
    outs = llm.generate(PROMPTS[:4], GREEDY, lora_request=loras, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [
        peft_greedy(model, r.lora_path if r else None, p, 6) for p, r in zip(PROMPTS[:4], loras)]
    assert (runner.num_compiled(), runner.lora.num_compiled()) == (compiled, 1)


@pytest.mark.parametrize("kind", ["qwen2", "qwen3"])      # q/k/v bias; q/k norms with head_dim 16
def test_other_llama_family_models_equal_peft(tiny_model_factory, tmp_path, kind):
    model = tiny_model_factory(kind)
    a = make_adapter(model, str(tmp_path / "a"), r=4, alpha=8, targets=("q_proj", "k_proj", "v_proj", "up_proj"),
                     seed=31)
    llm = LLM(model, enable_lora=True, max_loras=1, max_lora_rank=4, enforce_eager=True, max_model_len=64,
              max_num_seqs=4, max_num_batched_tokens=32, download_dir=str(tmp_path / "cache"))
    loras = [LoRARequest("a", 1, a), None]
    outs = llm.generate(PROMPTS[:2], GREEDY, lora_request=loras, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [
        peft_greedy(model, r.lora_path if r else None, p, 6) for p, r in zip(PROMPTS[:2], loras)]
