"""User scenarios: a vLLM user's scripts run against jaxpaged, with inputs the other tests do not try.

One module-scoped LLM on a tiny random-weight Llama (enforce_eager, small budgets) serves most
tests; server scenarios run in-process on FakeEngine. Each test pins behaviour a vLLM user relies on
(several were bugs found by probing the API, fixed since).
"""
from __future__ import annotations

import random

import numpy as np
import pytest
from fastapi.testclient import TestClient

from jaxpaged import LLM, SamplingParams
from jaxpaged.server.app import build_app
from tests.fake_engine import FakeEngine


@pytest.fixture(scope="module")
def llm(tiny_model_factory, tmp_path_factory):
    return LLM(model=tiny_model_factory("llama"), enforce_eager=True, block_size=8, max_model_len=96,
               max_num_seqs=4, max_num_batched_tokens=32, num_kv_blocks=14,
               download_dir=str(tmp_path_factory.mktemp("user-scenarios-cache")))


GREEDY = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)


# ------------------------------------------------------------------ behaviour that works (pinned)

def test_prompt_forms_give_the_same_greedy_tokens(llm):
    tok = llm.get_tokenizer()
    ids = tok.encode("Hello world")
    forms = ["Hello world", {"prompt": "Hello world"}, {"prompt_token_ids": ids}, ids, tuple(ids)]
    outs = [llm.generate(f, GREEDY, use_tqdm=False)[0] for f in forms]
    assert all(o.prompt_token_ids == ids for o in outs)
    assert len({tuple(o.outputs[0].token_ids) for o in outs}) == 1
    assert outs[0].prompt == "Hello world" and outs[3].prompt is None


def test_seeded_n_samples_survive_heavy_preemption_and_keep_shapes(llm):
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 320) for _ in range(rng.randrange(5, 30))] for _ in range(4)]
    params = [SamplingParams(temperature=0.9, top_p=0.9, seed=i, n=3, max_tokens=20, ignore_eos=True, logprobs=1)
              for i in range(4)]
    before = llm.llm_engine.get_stats().num_preemptions
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert llm.llm_engine.get_stats().num_preemptions > before        # 13 usable blocks of 8 for 12 sequences
    again = [llm.generate(p, sp, use_tqdm=False)[0] for p, sp in zip(prompts, params)]   # alone: no preemption
    for o, a in zip(outs, again):
        assert [c.index for c in o.outputs] == [0, 1, 2]
        assert [c.token_ids for c in o.outputs] == [c.token_ids for c in a.outputs]
        for c in o.outputs:
            assert c.finish_reason == "length" and len(c.token_ids) == 20 and len(c.logprobs) == 20
            assert c.cumulative_logprob == pytest.approx(sum(e[t].logprob for e, t in zip(c.logprobs, c.token_ids)),
                                                         abs=1e-3)
    s = llm.llm_engine.get_stats()
    assert s.num_running == 0 and s.num_waiting == 0 and s.kv_cache_usage == 0.0


def test_text_equals_decode_of_token_ids_for_random_bytes(llm):
    """A random model emits arbitrary byte-level tokens (broken UTF-8 included): text must still be
    exactly the tokenizer's decoding of token_ids."""
    tok = llm.get_tokenizer()
    outs = llm.generate(["Unicode: café, 日本語", "emoji 🙂"], SamplingParams(temperature=1.0, seed=7, n=2, max_tokens=16),
                        use_tqdm=False)
    for o in outs:
        for c in o.outputs:
            assert c.text == tok.decode(c.token_ids, skip_special_tokens=True)


def test_engine_loop_abort_midway_and_reuse_ids(llm):
    eng = llm.llm_engine
    eng.add_request("a", "Hello world", SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
    eng.add_request("b", "The quick", SamplingParams(temperature=0.0, max_tokens=6, n=2, ignore_eos=True))
    finished = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.request_id == "b" and len(out.outputs[0].token_ids) == 2:
                eng.abort_request("b")
            if out.finished:
                finished[out.request_id] = out
    assert set(finished) == {"a"} and eng.get_stats().kv_cache_usage == 0.0
    first = finished["a"].outputs[0].token_ids
    eng.add_request("a", "Hello world", SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))  # same id again
    eng.add_request("b", "The quick", SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))   # aborted id again
    done = {}
    while eng.has_unfinished_requests():
        done.update({o.request_id: o for o in eng.step() if o.finished})
    assert done["a"].outputs[0].token_ids == first and len(done["b"].outputs[0].token_ids) == 6
    m = done["a"].metrics
    assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.last_token_time <= m.finished_time


def test_max_tokens_none_and_past_max_model_len_stop_at_max_model_len(llm):
    p = list(range(3, 93))            # 90 tokens, max_model_len 96
    for sp in (SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True),
               SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True)):
        c = llm.generate([p], sp, use_tqdm=False)[0].outputs[0]
        assert c.finish_reason == "length" and len(p) + len(c.token_ids) == 96


def test_min_tokens_bans_stop_ids_then_stops(llm):
    free = llm.generate("Hello", SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False)[0]
    first = free.outputs[0].token_ids[0]
    c = llm.generate("Hello", SamplingParams(temperature=0.0, max_tokens=8, stop_token_ids=[first]),
                     use_tqdm=False)[0].outputs[0]
    assert c.finish_reason == "stop" and c.stop_reason == first and c.token_ids == [first]
    c = llm.generate("Hello", SamplingParams(temperature=0.0, max_tokens=8, stop_token_ids=[first], min_tokens=3),
                     use_tqdm=False)[0].outputs[0]
    assert len(c.token_ids) >= 3 and first not in c.token_ids[:3]


# ------------------------------------------------------------------ bugs

def test_chat_accepts_openai_content_parts(llm):
    plain = llm.chat([{"role": "user", "content": "Hi there"}], GREEDY, use_tqdm=False)[0]
    parts = llm.chat([{"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": " there"}]}],
                     GREEDY, use_tqdm=False)[0]
    assert parts.prompt_token_ids == plain.prompt_token_ids


def test_chat_accepts_chat_template_kwargs(llm):
    tmpl = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if shout %}LOUD {% endif %}assistant:")
    out = llm.chat([{"role": "user", "content": "Hi"}], GREEDY, use_tqdm=False, chat_template=tmpl,
                   chat_template_kwargs={"shout": True})[0]
    assert llm.get_tokenizer().decode(out.prompt_token_ids).endswith("LOUD assistant:")


def test_generate_accepts_numpy_token_ids(llm):
    ids = [5, 6, 7, 8]
    ref = llm.generate([ids], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    assert llm.generate(np.array(ids), GREEDY, use_tqdm=False)[0].outputs[0].token_ids == ref
    assert llm.generate([np.int64(t) for t in ids], GREEDY, use_tqdm=False)[0].outputs[0].token_ids == ref


@pytest.fixture(scope="module")
def fake_aliases():
    with TestClient(build_app(FakeEngine(max_model_len=64), ["main-name", "alias"])) as client:
        yield client


def test_server_echoes_requested_model_alias(fake_aliases):
    r = fake_aliases.post("/v1/completions", json={"model": "alias", "prompt": "Hello", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["model"] == "alias"
    r = fake_aliases.post("/v1/chat/completions", json={"model": "alias", "max_tokens": 2,
                                                        "messages": [{"role": "user", "content": "Hi"}]})
    assert r.status_code == 200 and r.json()["model"] == "alias"


def test_server_accepts_null_n(fake_aliases):
    for path, body in (("/v1/completions", {"prompt": "Hello", "max_tokens": 2, "n": None}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
                                                 "n": None})):
        r = fake_aliases.post(path, json=body)
        assert r.status_code == 200, r.text
        assert len(r.json()["choices"]) == 1


def test_server_invalid_inputs_get_openai_400s_and_server_keeps_serving(fake_aliases):
    bad = [({"prompt": [[]]}, "prompt"), ({"prompt": [""]}, "prompt"), ({"stop": [""]}, "stop"),
           ({"logprobs": 21}, "logprobs"), ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": 100}, "max_tokens"),
           ({"seed": 2 ** 64}, "seed"), ({"min_tokens": 5}, "min_tokens"), ({"top_k": -2}, "top_k")]
    for extra, param in bad:
        r = fake_aliases.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 2, **extra})
        assert r.status_code == 400, (extra, r.text)
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and err["param"] == param, (extra, err)
    r = fake_aliases.post("/v1/completions", json={"prompt": [[5, 6], [7]], "n": 2, "max_tokens": 2, "echo": True,
                                                   "logprobs": 1})
    assert r.status_code == 200 and [c["index"] for c in r.json()["choices"]] == [0, 1, 2, 3]
    assert r.json()["usage"]["prompt_tokens"] == 3
