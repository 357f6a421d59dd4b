"""The one input path (jaxpaged/inputs.py): every prompt form, every rule once, ValueError naming the field.

No model: the processor runs on the tiny tokenizer; the engine and the server call this same code.
"""
from __future__ import annotations

import numpy as np
import pytest

from jaxpaged.inputs import InputProcessor, ProcessedPrompt, as_prompt_list, check_token_ids, plain_message
from jaxpaged.sampling_params import BeamSearchParams, SamplingParams
from tests.fake_engine import FakeEngine
from tests.tiny_models import make_tokenizer

VOCAB = 320


@pytest.fixture(scope="module")
def proc():
    return InputProcessor(make_tokenizer(VOCAB), vocab_size=VOCAB, max_model_len=32, kv_capacity_tokens=24,
                          max_num_seqs=4, max_logprobs=6)


def test_every_prompt_form_gives_the_same_ids(proc):
    text = "Hello world"
    ids = list(proc.tokenizer.encode(text))
    forms = [ids, tuple(ids), np.array(ids), np.array(ids, np.int32), {"prompt_token_ids": ids},
             {"prompt_token_ids": np.array(ids)}]
    for form in forms:
        got, _ = proc.process(form)
        assert got == ProcessedPrompt(None, ids) and all(type(t) is int for t in got.prompt_token_ids)
    for form in (text, {"prompt": text}):
        assert proc.process(form)[0] == ProcessedPrompt(text, ids)


@pytest.mark.parametrize("prompt,params,field", [
    ("", None, "prompt"),
    ([], None, "prompt"),
    (np.array([], np.int64), None, "prompt"),
    ({"text": "x"}, None, "prompt"),
    (3.5, None, "prompt"),
    ([1, "2"], None, "prompt_token_ids"),
    ([1, True], None, "prompt_token_ids"),
    (np.array([1.0, 2.0]), None, "prompt_token_ids"),
    (np.array([[1, 2]]), None, "prompt_token_ids"),
    ([5, VOCAB], None, "prompt_token_ids"),
    ([-1, 5], None, "prompt_token_ids"),
    ([5] * 32, None, "prompt"),                              # no room for a generated token (max_model_len 32)
    ([5] * 24, None, "prompt"),                              # prompt + 1 exceeds the KV pool (24 tokens)
    ([5], SamplingParams(n=5), "n"),                         # n > max_num_seqs
    ([5], SamplingParams(logprobs=7), "logprobs"),           # > max_logprobs
    ([5], SamplingParams(stop_token_ids=[VOCAB]), "stop_token_ids"),
    ([5], {"temperature": 0.0}, "sampling_params"),
    ([5], BeamSearchParams(beam_width=4, max_tokens=2), "beam_width"),   # 2 * 4 candidates > max_logprobs
    ([5], BeamSearchParams(beam_width=5, max_tokens=2), "beam_width"),
])
def test_each_rule_names_its_field(proc, prompt, params, field):
    with pytest.raises(ValueError, match=f"^{field}"):
        proc.process(prompt, params)


def test_limits_are_inclusive_where_they_should_be(proc):
    assert len(proc.process([5] * 23)[0].prompt_token_ids) == 23     # 23 + 1 == the KV pool
    assert proc.process([5], SamplingParams(n=4))[1].n == 4
    assert proc.process([5], BeamSearchParams(beam_width=3, max_tokens=2))[1].beam_width == 3


def test_prompt_lists():
    assert as_prompt_list("a") == ["a"] and as_prompt_list({"prompt": "a"}) == [{"prompt": "a"}]
    assert as_prompt_list([1, 2]) == [[1, 2]] and as_prompt_list([np.int64(1), 2]) == [[np.int64(1), 2]]
    assert as_prompt_list([[1], [2, 3]]) == [[1], [2, 3]] and as_prompt_list(["a", "b"]) == ["a", "b"]
    one = as_prompt_list(np.array([1, 2]))
    assert len(one) == 1 and one[0].tolist() == [1, 2]
    rows = as_prompt_list(np.array([[1, 2], [3, 4]]))
    assert [r.tolist() for r in rows] == [[1, 2], [3, 4]]
    for bad in ([], np.zeros((1, 1, 1), np.int64)):
        with pytest.raises(ValueError, match="^prompts"):
            as_prompt_list(bad)


def test_token_id_check_and_chat_messages():
    assert check_token_ids(np.array([0, 9]), 10, "tokens") == [0, 9]
    with pytest.raises(ValueError, match=r"^tokens: token ids \[10\]"):
        check_token_ids([0, 10], 10, "tokens")
    assert plain_message(0, {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text",
                                                                                          "text": "b"}]}) \
        == {"role": "user", "content": "ab"}
    with pytest.raises(ValueError, match=r"^messages\[1\]"):
        plain_message(1, {"content": "no role"})


def test_the_fake_engine_applies_the_real_rules():
    """Server tests run on FakeEngine: it must reject exactly what the engine rejects."""
    fake = FakeEngine(max_model_len=32, max_num_seqs=4, num_kv_blocks=3, block_size=16)
    for prompt, params, field in [([], None, "prompt"), ([VOCAB], None, "prompt_token_ids"),
                                  ([5] * 32, None, "prompt"), ([5], SamplingParams(n=5), "n")]:
        with pytest.raises(ValueError, match=f"^{field}"):
            fake.add_request("r", prompt, params)
    assert not fake.has_unfinished_requests()
    fake.add_request("r", [5, 6], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="^request_id"):
        fake.add_request("r", [5, 6], SamplingParams(max_tokens=2))
