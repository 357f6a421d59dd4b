"""SamplingParams / BeamSearchParams validation (ValueError naming the field) and the vLLM-shaped outputs."""
from __future__ import annotations

import pytest

from jaxpaged.outputs import (BeamSearchOutput, BeamSearchSequence, CompletionOutput, Logprob, RequestMetrics,
                              RequestOutput, make_logprobs_entry, make_prompt_logprobs)
from jaxpaged.sampling_params import BeamSearchParams, SamplingParams, SamplingType

BAD = [
    ("n", 0), ("n", 1.5), ("n", True),
    ("best_of", 0),
    ("presence_penalty", 2.5), ("presence_penalty", -2.1), ("presence_penalty", "1"),
    ("frequency_penalty", 3.0), ("frequency_penalty", float("nan")),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0), ("repetition_penalty", float("inf")),
    ("temperature", -1), ("temperature", -0.01), ("temperature", "hot"), ("temperature", None),
    ("temperature", float("inf")),
    ("top_p", 0.0), ("top_p", 1.01), ("top_p", -0.5),
    ("top_k", -2), ("top_k", 2.0), ("top_k", None),
    ("min_p", -0.1), ("min_p", 1.5),
    ("seed", 1.5), ("seed", "7"),
    ("max_tokens", 0), ("max_tokens", -3), ("max_tokens", 2.0),
    ("min_tokens", -1),
    ("logprobs", -1), ("logprobs", 1.0),
    ("prompt_logprobs", -1),
    ("stop", [""]), ("stop", 3), ("stop", ["a", 1]),
    ("stop_token_ids", [1, "2"]), ("stop_token_ids", [-1]), ("stop_token_ids", 5),
    ("ignore_eos", 1), ("skip_special_tokens", "yes"), ("include_stop_str_in_output", None),
    ("detokenize", 0), ("spaces_between_special_tokens", 1),
]


@pytest.mark.parametrize("field,value", BAD, ids=[f"{f}={v!r}" for f, v in BAD])
def test_invalid_value_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_messages_are_readable():
    with pytest.raises(ValueError, match=r"^temperature must be >= 0, got -1$"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match=r"^top_p must be in \(0, 1\]"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match=r"^max_tokens must be >= 1"):
        SamplingParams(max_tokens=0)


def test_cross_field_rules():
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(max_tokens=4, min_tokens=5)
    SamplingParams(max_tokens=None, min_tokens=50)
    with pytest.raises(ValueError, match="detokenize"):
        SamplingParams(stop=["x"], detokenize=False)


def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p, p.max_tokens, p.min_tokens) == (1, 1.0, 1.0, 0, 0.0, 16, 0)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert p.stop == [] and p.stop_token_ids == [] and p.logprobs is None and p.prompt_logprobs is None
    assert p.skip_special_tokens and p.spaces_between_special_tokens and p.detokenize
    assert not p.ignore_eos and not p.include_stop_str_in_output and p.seed is None
    assert p.sampling_type == SamplingType.RANDOM and not p.uses_penalties


def test_normalisation():
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(top_k=-1).top_k == 0
    g = SamplingParams(temperature=0.0, top_p=0.5, top_k=7, min_p=0.2)
    assert g.is_greedy and (g.top_p, g.top_k, g.min_p) == (1.0, 0, 0.0)
    assert g.sampling_type == SamplingType.GREEDY
    assert SamplingParams(temperature=0.8, top_k=1).is_greedy
    assert SamplingParams(seed=3).sampling_type == SamplingType.RANDOM_SEED
    assert SamplingParams(repetition_penalty=1.2).uses_penalties


def test_validate_model_dependent():
    p = SamplingParams(logprobs=5, stop_token_ids=[3, 99])
    assert p.validate(vocab_size=100, max_logprobs=5) is p
    with pytest.raises(ValueError, match="stop_token_ids"):
        p.validate(vocab_size=50)
    with pytest.raises(ValueError, match="logprobs"):
        p.validate(max_logprobs=4)
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=30).validate(max_logprobs=20)
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=200).validate(max_model_len=128)
    q = SamplingParams()
    q.temperature = -2            # mutable: validate() re-checks
    with pytest.raises(ValueError, match="temperature"):
        q.validate()


def test_derived_helpers_and_clone():
    p = SamplingParams(stop=["ab", "xyz1"], stop_token_ids=[7])
    assert p.output_text_buffer_length == 3
    assert SamplingParams(stop=["xyz"], include_stop_str_in_output=True).output_text_buffer_length == 0
    assert p.all_stop_token_ids([2]) == {2, 7}
    assert SamplingParams(ignore_eos=True, stop_token_ids=[7]).all_stop_token_ids([2]) == {7}
    c = p.clone()
    assert c == p and c is not p and c.stop is not p.stop
    c.stop.append("more")
    assert p.stop == ["ab", "xyz1"]


def test_beam_search_params():
    b = BeamSearchParams(beam_width=4, max_tokens=10)
    assert (b.ignore_eos, b.temperature, b.length_penalty, b.include_stop_str_in_output) == (False, 0.0, 1.0, False)
    assert b.clone() == b
    for field, value in [("beam_width", 0), ("beam_width", 2.0), ("max_tokens", 0), ("temperature", -1.0),
                         ("length_penalty", float("inf")), ("length_penalty", "1"), ("ignore_eos", 1)]:
        kw = dict(beam_width=2, max_tokens=5)
        kw[field] = value
        with pytest.raises(ValueError, match=field):
            BeamSearchParams(**kw)


def test_logprobs_entry_shape():
    dec = {5: "a", 9: "b", 1: "c"}.get
    e = make_logprobs_entry(9, -1.5, 2, top_ids=[5, 9, 1], top_logprobs=[-0.5, -1.5, -2.0], decode=dec)
    assert list(e) == [9, 5, 1]                       # sampled first, then the top-N without repeats
    assert e[9] == Logprob(-1.5, 2, "b") and e[5] == Logprob(-0.5, 1, "a") and e[1] == Logprob(-2.0, 3, "c")
    e0 = make_logprobs_entry(3, -4.0, 17)
    assert e0 == {3: Logprob(-4.0, 17, None)}
    assert isinstance(list(e)[0], int) and isinstance(e[9].logprob, float)


def test_outputs_repr_and_fields():
    c = CompletionOutput(0, "hi", [1, 2], -0.5, None, "stop", "###")
    assert c.finished() and "text='hi'" in repr(c) and "stop_reason=###" in repr(c)
    m = RequestMetrics(arrival_time=1.0, first_scheduled_time=1.5, first_token_time=2.0)
    assert m.time_to_first_token == 1.0 and m.time_in_queue == 0.5
    r = RequestOutput("r0", "p", [3], None, [c], True, m, num_cached_tokens=0)
    assert "request_id=r0" in repr(r) and "outputs=[CompletionOutput(" in repr(r)
    b = BeamSearchOutput([BeamSearchSequence(tokens=[1, 2], text="x", cum_logprob=-1.0)])
    assert b.sequences[0].finish_reason is None and "cum_logprob=-1.0" in repr(b)


def test_prompt_logprobs_shape():
    pl = make_prompt_logprobs([5, 6, 7], [-1.0, -2.0], [1, 4], [[6], [8]], [[-1.0], [-0.5]], decode=str)
    assert pl[0] is None and len(pl) == 3
    assert pl[1] == {6: Logprob(-1.0, 1, "6")}
    assert pl[2] == {7: Logprob(-2.0, 4, "7"), 8: Logprob(-0.5, 1, "8")}
    assert make_prompt_logprobs([5], [], []) == [None]
