"""Incremental detokenization (multi-byte characters split across byte-level tokens, special tokens, prompt
context) and the stop rules (stop strings spanning tokens, stop ids, eos, min_tokens, max_tokens)."""
from __future__ import annotations

import json

import pytest

from jaxpaged.detokenizer import (IncrementalDetokenizer, SequenceDetokenizer, StopChecker, StopResult,
                                  TokenDecoder, check_stop_strings, find_stop_string)
from jaxpaged.sampling_params import SamplingParams as SP
from tests.tiny_models import make_tokenizer

TEXTS = [
    "Hello world! How are you today?",
    "Unicode: café, naïve, 日本語, emoji 🙂. ",
    "🙂🙂🙂 日本語日本語 ∑ 𝄞 — “quotes” ñ",
    "The capital of France is Paris.\n\nJAX  is   a library\tfor array computing.",
]


@pytest.fixture(scope="module")
def tiny():
    return make_tokenizer(320)


@pytest.fixture(scope="module")
def gpt2(tiny):
    """transformers' GPT-2 tokenizer class over the tiny byte-level BPE vocabulary, with <|endoftext|>."""
    import transformers
    model = json.loads(tiny.backend_tokenizer.to_str())["model"]
    vocab = dict(model["vocab"])
    vocab["<|endoftext|>"] = len(vocab)
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split()) for m in model["merges"]]
    return transformers.GPT2TokenizerFast(vocab=vocab, merges=merges)


@pytest.fixture(scope="module")
def metaspace():
    """A SentencePiece-style tokenizer (spaces as '▁', the decoder strips the leading space)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from tests.tiny_models import TEXT
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                                        show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def _stream(tok, ids, prompt=(), skip=True, chunk=1):
    d = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip)
    deltas = [d.append(ids[i:i + chunk]) for i in range(0, len(ids), chunk)]
    tail = d.flush()
    return deltas, tail, d


# ---- incremental detokenization ----------------------------------------------------------------------

@pytest.mark.parametrize("which", ["tiny", "gpt2"])
@pytest.mark.parametrize("skip", [True, False])
def test_incremental_text_equals_full_decode(which, skip, request):
    tok = request.getfixturevalue(which)
    special = "</s>" if which == "tiny" else "<|endoftext|>"
    prompt = tok.encode("Q: 日本")
    for text in TEXTS + [f"hi{special}there 🙂{special}"]:
        ids = tok.encode(text)
        for chunk in (1, 3):
            deltas, tail, d = _stream(tok, ids, prompt, skip, chunk)
            assert "".join(deltas) + tail == tok.decode(ids, skip_special_tokens=skip), (text, chunk)
            assert tail == ""
            assert not any("\ufffd" in x for x in deltas), deltas     # never half a character


def test_multibyte_character_is_held_until_complete(tiny):
    ids = tiny.encode("a🙂")
    assert [tiny.decode([i]) for i in ids[1:]].count("\ufffd") >= 2   # the emoji spans several tokens
    d = IncrementalDetokenizer(tiny, [])
    assert d.append(ids[0]) == "a"
    for i in ids[1:-1]:
        assert d.append(i) == ""
    assert d.append(ids[-1]) == "🙂"


def test_flush_returns_an_incomplete_tail(tiny):
    ids = tiny.encode("ok 日本語")[:-1]                       # cut inside the last character
    deltas, tail, d = _stream(tiny, ids)
    assert "\ufffd" in tail and "".join(deltas) + tail == tiny.decode(ids)
    assert d.flush() == ""


def test_prompt_context_keeps_the_leading_space(metaspace):
    """SentencePiece decoders strip a leading space; decoding with the prompt's last tokens as context
    keeps the space between prompt and first generated word (vLLM's behaviour)."""
    prompt = metaspace.encode("The capital of France")
    out = metaspace.encode("is Paris. Hello world")
    deltas, tail, _ = _stream(metaspace, out, prompt)
    text = "".join(deltas) + tail
    assert text.startswith(" is") and text == " is Paris. Hello world"
    assert metaspace.decode(prompt + out) == metaspace.decode(prompt) + text


def test_token_decoder(tiny):
    dec = TokenDecoder(tiny)
    ids = tiny.encode("Hello 🙂")
    assert dec(ids[0]) == tiny.decode([ids[0]]) and dec(2) == "</s>"      # special tokens kept
    assert dec(ids[-1]) == "\ufffd"                                       # a lone byte of the emoji
    assert dec._cache[ids[0]] == dec(ids[0])


# ---- stop strings ------------------------------------------------------------------------------------

def test_find_stop_string_earliest_and_only_in_new_text():
    assert find_stop_string("abc STOP def", 12, ["STOP"]) == (4, "STOP")
    assert find_stop_string("abc STOP def END", 4, ["STOP", "END"]) == (13, "END")   # STOP was old text
    assert find_stop_string("xx ab", 1, ["ab"]) == (3, "ab")                          # spans old + new
    assert find_stop_string("x END y STOP", 12, ["STOP", "END"]) == (2, "END")        # earliest wins
    assert find_stop_string("abc", 0, ["abc"]) is None
    assert find_stop_string("abc", 3, []) is None
    assert check_stop_strings("say hi### bye", 9, ["###"], False) == ("###", "say hi")
    assert check_stop_strings("say hi### bye", 9, ["###"], True) == ("###", "say hi###")


def _run(tok, text, params, prompt="Q:", eos=(2,), max_model_len=None, extra_ids=()):
    seq = SequenceDetokenizer(tok, tok.encode(prompt), params, eos_token_ids=eos, max_model_len=max_model_len)
    result = None
    for i in list(tok.encode(text)) + list(extra_ids):
        result = seq.append(i)
        if result is not None:
            break
    return seq, result


def test_stop_string_spanning_tokens_truncates(tiny):
    text = "The quick brown fox jumps over the lazy dog."
    ids = tiny.encode(text)
    stop = "k brown f"
    assert not any(stop in tiny.decode([i]) for i in ids)             # no single token holds it
    seq, r = _run(tiny, text, SP(stop=[stop, "lazy"], max_tokens=100))
    assert r == StopResult("stop", stop) and seq.finish_reason == "stop" and seq.stop_reason == stop
    assert seq.text == "The quic"
    assert seq.num_output_tokens < len(ids)                            # ended at the token completing it
    seq, r = _run(tiny, text, SP(stop=[stop], include_stop_str_in_output=True, max_tokens=100))
    assert seq.text == "The quick brown f"


def test_stop_string_inside_multibyte_text(tiny):
    seq, r = _run(tiny, "Unicode: café, naïve, 日本語, emoji 🙂. after", SP(stop=["語, e"], max_tokens=100))
    assert r.stop_reason == "語, e" and seq.text == "Unicode: café, naïve, 日本"
    seq, r = _run(tiny, "one 🙂 two", SP(stop=["🙂"], max_tokens=100))
    assert seq.text == "one "


def test_stop_token_ids_eos_and_min_tokens(tiny):
    hello = tiny.encode("Hello world")
    n = len(hello)
    # a stop token id ends the sequence; its text is not added; stop_reason is the id
    stop_id = hello[-1]
    seq, r = _run(tiny, "Hello world", SP(stop_token_ids=[stop_id], max_tokens=100))
    assert r == StopResult("stop", stop_id) and seq.num_output_tokens == len(hello)
    assert seq.text == tiny.decode(hello[:-1])
    seq, r = _run(tiny, "Hello world", SP(stop_token_ids=[stop_id], max_tokens=100, include_stop_str_in_output=True))
    assert seq.text == "Hello world"
    # eos: stop_reason None; not before min_tokens; never with ignore_eos
    seq, r = _run(tiny, "Hello world", SP(max_tokens=100), extra_ids=[2])
    assert r == StopResult("stop", None) and seq.text == "Hello world" and seq.num_output_tokens == n + 1
    seq, r = _run(tiny, "Hi", SP(max_tokens=100, min_tokens=5), extra_ids=[2, 2, 2, 2, 2])
    assert r == StopResult("stop", None) and seq.num_output_tokens == 5
    seq, r = _run(tiny, "Hi", SP(max_tokens=100, ignore_eos=True), extra_ids=[2, 2, 2])
    assert r is None and not seq.finished
    # stop strings also wait for min_tokens
    seq, r = _run(tiny, "ab ab ab ab ab ab", SP(stop=["ab"], min_tokens=3, max_tokens=100))
    assert r.stop_reason == "ab" and seq.num_output_tokens >= 3 and seq.text.count("ab") >= 1
    assert n > 1


def test_length_limits(tiny):
    text = "The quick brown fox jumps over the lazy dog."
    ids = tiny.encode(text)
    seq, r = _run(tiny, text, SP(max_tokens=4))
    assert r == StopResult("length") and seq.num_output_tokens == 4 and seq.text == tiny.decode(ids[:4])
    prompt_len = len(tiny.encode("Q:"))
    seq, r = _run(tiny, text, SP(max_tokens=None), max_model_len=prompt_len + 6)
    assert r == StopResult("length") and seq.num_output_tokens == 6
    with pytest.raises(RuntimeError):
        seq.append(5)
    # a length stop in the middle of a character flushes the partial text, like decode()
    cut = tiny.encode("ab 日")
    seq, r = _run(tiny, "ab 日", SP(max_tokens=len(cut) - 1))
    assert seq.text == tiny.decode(cut[:-1]) and seq.text.endswith("\ufffd")


def test_stream_text_holds_back_possible_stop_prefix(tiny):
    seq = SequenceDetokenizer(tiny, [], SP(stop=["STOP!"], max_tokens=100), eos_token_ids=[2])
    for i in tiny.encode("Hello world"):
        seq.append(i)
    assert seq.text == "Hello world" and seq.stream_text() == "Hello w"   # 4 = len("STOP!") - 1 held back
    seq.append(2)
    assert seq.finished and seq.stream_text() == seq.text


def test_stop_checker_direct():
    p = SP(stop_token_ids=[9], min_tokens=2, max_tokens=5)
    c = StopChecker(p, eos_token_ids=[2], max_model_len=100, num_prompt_tokens=10)
    assert c.check_token(9, 1) is None and c.check_token(9, 2) == StopResult("stop", 9)
    assert c.check_token(2, 3) == StopResult("stop", None) and c.check_token(4, 3) is None
    assert c.check_length(4) is None and c.check_length(5) == StopResult("length")
    c = StopChecker(SP(max_tokens=None), max_model_len=12, num_prompt_tokens=10)
    assert c.max_tokens == 2 and c.check_length(1) is None and c.check_length(2) == StopResult("length")


def test_no_detokenize(tiny):
    seq = SequenceDetokenizer(tiny, [], SP(detokenize=False, max_tokens=3))
    assert seq.append(40) is None and seq.append(41) is None
    assert seq.append(42) == StopResult("length") and seq.text == "" and seq.num_output_tokens == 3
