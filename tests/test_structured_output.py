"""Structured output end to end on a tiny random model: every output that finishes with "stop" matches its
JSON schema / regex / choice / grammar (random schemas, seeds, n > 1, logprobs, prefix caching, preemption),
the grammar follows every sampled token, bad specs are a ValueError naming the field, and logit_bias
steers greedy output."""
from __future__ import annotations

import json
import re

import jsonschema
import numpy as np
import pytest

import jaxpaged
from jaxpaged import SamplingParams
from jaxpaged.sequence import Sequence
from jaxpaged.sampling_params import StructuredOutputsParams as SO
from jaxpaged.scheduler import Scheduler
from tests.engine_utils import make_llm
from tests.tiny_models import TEXT


def random_schema(rng: np.random.Generator, depth: int = 0) -> dict:
    """A random JSON schema whose instances are bounded in size (so a random model can finish one)."""
    kinds = ["integer", "boolean", "enum", "string", "number"] + (["object", "array"] if depth < 2 else [])
    kind = kinds[int(rng.integers(len(kinds)))]
    if kind == "integer":
        lo = int(rng.integers(-50, 50))
        return {"type": "integer", "minimum": lo, "maximum": lo + int(rng.integers(0, 200))}
    if kind == "number":
        return {"type": "number", "minimum": 0, "maximum": 10}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "enum":
        return {"enum": ["red", "green", 3, None][: int(rng.integers(1, 5))]}
    if kind == "string":
        return {"type": "string", "maxLength": int(rng.integers(0, 6))}
    if kind == "array":
        return {"type": "array", "items": random_schema(rng, depth + 1), "maxItems": int(rng.integers(0, 3))}
    names = [f"k{i}" for i in range(int(rng.integers(1, 4)))]
    return {"type": "object", "properties": {n: random_schema(rng, depth + 1) for n in names},
            "required": names, "additionalProperties": False}


@pytest.fixture(scope="module")
def llm(tiny_llama, tmp_path_factory):
    # a small KV pool: the mixed batch below preempts
    return make_llm(tiny_llama, tmp_path_factory, max_model_len=256, num_kv_blocks=28, max_num_seqs=16,
                    enable_prefix_caching=True)


def _all_states(llm):
    return [c.seq.structured_output for r in llm.llm_engine._requests.values() for c in r.completions]


def test_random_schemas_and_seeds_finished_outputs_validate(llm):
    rng = np.random.default_rng(1234)
    schemas = [{"type": "object", "properties": {"root": random_schema(rng)}, "required": ["root"],
                "additionalProperties": False} for _ in range(20)]
    prompts, params = [], []
    for i, schema in enumerate(schemas):
        prompts.append(TEXT[:160] if i % 2 else TEXT[200:360])    # long shared prefixes: prefix-cache hits
        params.append(SamplingParams(temperature=float(rng.choice([0.0, 0.8, 1.0])), seed=i, max_tokens=120,
                                     top_p=float(rng.choice([1.0, 0.9])), logprobs=1 if i % 3 == 0 else None,
                                     structured_outputs=SO(json=schema)))
    # unconstrained requests in the same batches
    prompts += [TEXT[:160]] * 3
    params += [SamplingParams(temperature=0.7, seed=s, max_tokens=120, ignore_eos=True) for s in range(3)]
    outs = llm.generate(prompts, params, use_tqdm=False)
    stopped = 0
    for out, schema in zip(outs, schemas):
        c = out.outputs[0]
        if c.finish_reason == "stop":
            stopped += 1
            jsonschema.validate(json.loads(c.text), schema)
        if params[0].logprobs is not None and c.logprobs is not None:
            assert len(c.logprobs) == len(c.token_ids)
    assert stopped >= 16, [o.outputs[0].finish_reason for o in outs]
    stats = llm.llm_engine.get_stats()
    assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0     # both paths ran under grammars
    assert stats.kv_cache_usage == 0.0


def test_regex_choice_grammar_and_json_object_with_n_and_seeds(llm):
    specs = [(SO(regex=r"[a-c]{2,4}-[0-9]{2}"), lambda t: re.fullmatch(r"[a-c]{2,4}-[0-9]{2}", t)),
             (SO(choice=["yes", "no", "maybe so"]), lambda t: t in ("yes", "no", "maybe so")),
             (SO(grammar='root ::= "(" [0-9] ("+" [0-9])? ")"'), lambda t: re.fullmatch(r"\(\d(\+\d)?\)", t)),
             (SO(grammar='start: "<" NAME ">"\nNAME: /[xy]{1,3}/'), lambda t: re.fullmatch(r"<[xy]{1,3}>", t)),
             (SO(json_object=True), lambda t: isinstance(json.loads(t), dict)),
             (SO(json={"type": "array", "items": {"type": "boolean"}, "maxItems": 3}, disable_any_whitespace=True),
              lambda t: " " not in t and isinstance(json.loads(t), list))]
    params = [SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=150, structured_outputs=spec)
              for spec, _ in specs]
    outs = llm.generate(["Hello"] * len(specs), params, use_tqdm=False)
    again = llm.generate(["Hello"], params[0], use_tqdm=False)[0]
    assert [c.text for c in again.outputs] == [c.text for c in outs[0].outputs]     # seeded
    for out, (_, check) in zip(outs, specs):
        assert len(out.outputs) == 3
        for c in out.outputs:
            if c.finish_reason == "stop":
                assert check(c.text), c.text
    assert sum(c.finish_reason == "stop" for o in outs[:4] for c in o.outputs) == 12


def test_grammar_accepts_every_sampled_token_and_stop_strings_end_early(llm):
    eng = llm.llm_engine
    for i in range(4):
        eng.add_request(f"g{i}", "Hello", SamplingParams(temperature=1.0, seed=i, max_tokens=60, stop=['"'],
                                                          structured_outputs=SO(json={"type": "object"})))
    states = _all_states(llm)
    outs = {}
    while eng.has_unfinished_requests():
        for o in eng.step():
            outs[o.request_id] = o
    assert all(s.error is None for s in states)   # accept() never refused a token: none was masked
    for o in outs.values():
        c = o.outputs[0]
        assert c.finish_reason == "stop" and '"' not in c.text and c.text.startswith("{")


def test_a_completed_grammar_ends_the_sequence_even_with_ignore_eos(llm):
    out = llm.generate(["Hello"], SamplingParams(temperature=1.0, seed=0, max_tokens=50, ignore_eos=True,
                                                 structured_outputs=SO(choice=["yes", "no"])), use_tqdm=False)[0]
    c = out.outputs[0]
    assert c.finish_reason == "stop" and c.text in ("yes", "no") and len(c.token_ids) < 50


def test_bad_specs_are_value_errors_naming_the_field(llm):
    cases = [(dict(regex="(ab"), "structured_outputs.regex"), (dict(json={"type": "foo"}), "structured_outputs.json"),
             (dict(json="{not json"), "structured_outputs.json"), (dict(grammar="start: nope"), "structured_outputs.grammar"),
             (dict(choice=[]), "structured_outputs.choice"), (dict(choice=["a"], regex="b"), "structured_outputs")]
    for kwargs, field in cases:
        with pytest.raises(ValueError, match=re.escape(field)):
            llm.generate(["Hi"], SamplingParams(structured_outputs=SO(**kwargs)), use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
    assert jaxpaged.StructuredOutputsParams is SO


def test_a_request_waits_while_its_grammar_compiles():
    class Pending:
        ready = False

        def is_ready(self):
            return self.ready

    s = Scheduler(num_blocks=20, block_size=4, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64,
                  enable_prefix_caching=False)
    slow = Sequence("slow", [1, 2, 3])
    slow.structured_output = Pending()
    s.add_sequence(slow)
    s.add_sequence(Sequence("plain", [4, 5]))
    out = s.schedule()
    assert [x.seq.seq_id for x in out.scheduled] == ["plain"] and list(s.waiting) == [slow]
    s.update_from_output(out)
    slow.structured_output.ready = True
    assert "slow" in [x.seq.seq_id for x in s.schedule().scheduled] and not s.waiting


def test_logit_bias_steers_greedy_output(llm):
    base = llm.generate(["Hello world"], SamplingParams(temperature=0.0, max_tokens=6), use_tqdm=False)[0]
    first = base.outputs[0].token_ids[0]
    target = 77 if first != 77 else 78
    biased = llm.generate(["Hello world"], SamplingParams(temperature=0.0, max_tokens=6, logit_bias={target: 100}),
                          use_tqdm=False)[0]
    assert list(biased.outputs[0].token_ids) == [target] * 6
    banned = llm.generate(["Hello world"], SamplingParams(temperature=0.0, max_tokens=1, logit_bias={first: -100}),
                          use_tqdm=False)[0]
    assert banned.outputs[0].token_ids[0] != first
    with pytest.raises(ValueError, match="logit_bias"):
        llm.generate(["Hi"], SamplingParams(logit_bias={320: 1.0}), use_tqdm=False)
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={1: 101.0})
