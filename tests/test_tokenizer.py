"""CachedTokenizer (jaxpaged/tokenizer.py) against transformers' AutoTokenizer on the same cache-entry files:
the same ids, texts, tokens, vocabulary and special tokens, the same chat-template renderings, and no
transformers import on the way (a warm start reads the entry's tokenizer with the `tokenizers` library)."""
from __future__ import annotations

import os
import pickle
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from jaxpaged.convert import load_model
from jaxpaged.tokenizer import CachedTokenizer, load_entry_tokenizer

TEXTS = ["Hello world", "The capital of France is Paris. 日本語 🙂", "  café  naïve\n\tx", "",
         "<|im_start|>user\nHi 12345<|im_end|>", "<s>a</s> b <unk>", "a\n\n\nb   c"]
CONVERSATIONS = [
    [{"role": "user", "content": "Hello world! 🙂"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"}],
]


@pytest.fixture(scope="module")
def entry_tokenizers(tiny_model_factory, smollm2_gguf, tmp_path_factory):
    """(name, entry tokenizer dir) of a cache entry from an HF directory and one from the built-in GGUF."""
    root = str(tmp_path_factory.mktemp("tok-cache"))
    out = []
    for name, model in (("tiny-llama", tiny_model_factory("llama")), ("smollm2-gguf", smollm2_gguf)):
        m = load_model(model, cache_dir=root, progress=False, write_cache=True)
        again = load_model(model, cache_dir=root, progress=False)
        assert again.from_cache and isinstance(again.tokenizer, CachedTokenizer), name
        out.append((name, again.tokenizer.name_or_path))
        del m
    return out


def test_same_as_transformers_on_cache_entries(entry_tokenizers):
    for name, path in entry_tokenizers:
        ours, hf = load_entry_tokenizer(path), AutoTokenizer.from_pretrained(path, local_files_only=True)
        assert isinstance(ours, CachedTokenizer), name
        for text in TEXTS:
            for special in (True, False):
                ids = ours.encode(text, add_special_tokens=special)
                assert ids == hf.encode(text, add_special_tokens=special), (name, text, special)
        ids = list(range(len(hf)))
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), name
            for spaces in (True, False):        # the detokenizer passes it
                assert (ours.decode([1, 5, 2, 7, 2], skip_special_tokens=skip, spaces_between_special_tokens=spaces)
                        == hf.decode([1, 5, 2, 7, 2], skip_special_tokens=skip, spaces_between_special_tokens=spaces))
            for i in list(range(5)) + [len(hf) - 1]:
                assert ours.decode([i], skip_special_tokens=skip) == hf.decode([i], skip_special_tokens=skip)
            assert (ours.convert_ids_to_tokens(ids[:50], skip_special_tokens=skip)
                    == hf.convert_ids_to_tokens(ids[:50], skip_special_tokens=skip))
        assert ours.convert_ids_to_tokens(3) == hf.convert_ids_to_tokens(3)
        assert ours.get_vocab() == hf.get_vocab() and len(ours) == len(hf) and ours.vocab_size == hf.vocab_size
        for attr in ("bos_token", "eos_token", "pad_token", "unk_token", "bos_token_id", "eos_token_id",
                     "pad_token_id", "unk_token_id"):
            assert getattr(ours, attr) == getattr(hf, attr), (name, attr)
        assert sorted(ours.all_special_ids) == sorted(hf.all_special_ids), name
        assert ours.chat_template == hf.chat_template, name
        for conv in CONVERSATIONS:
            for gen in (True, False):
                assert (ours.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
                        == hf.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)), name
        assert ours("Hello world").input_ids == hf("Hello world").input_ids     # other calls: transformers'
        again = pickle.loads(pickle.dumps(ours))
        assert again.encode(TEXTS[1]) == ours.encode(TEXTS[1]) and again.eos_token_id == ours.eos_token_id


def test_forms_it_cannot_serve_exactly_go_to_transformers(entry_tokenizers, tmp_path):
    """An add_bos_token override may make transformers rebuild the post-processor: AutoTokenizer then."""
    import json
    import shutil

    path = shutil.copytree(entry_tokenizers[0][1], tmp_path / "tok")
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**cfg, "add_bos_token": True}))
    tok = load_entry_tokenizer(str(path))
    assert not isinstance(tok, CachedTokenizer) and type(tok).__name__ == "TokenizersBackend"


_CHILD = r"""
import sys
from jaxpaged.convert import load_model
m = load_model(sys.argv[1], cache_dir=sys.argv[2], progress=False)
m.tokenizer.decode(m.tokenizer.encode("Hello world"))
from jaxpaged import LLM, SamplingParams
llm = LLM(sys.argv[1], download_dir=sys.argv[2], enforce_eager=True, max_num_seqs=4, max_num_batched_tokens=32,
          max_model_len=64)
llm.generate(["Hello there"], SamplingParams(temperature=0.0, max_tokens=3, stop=["zz"]), use_tqdm=False)
print("RESULT", m.from_cache, type(m.tokenizer).__name__, "transformers" in sys.modules, "orbax" in sys.modules,
      "torch" in sys.modules)
"""


def test_warm_load_imports_neither_transformers_nor_orbax(tiny_llama, tmp_path):
    """Nor does the engine's use of it: encoding and incremental detokenization of a request."""
    load_model(tiny_llama, cache_dir=str(tmp_path), progress=False, write_cache=True)
    proc = subprocess.run([sys.executable, "-c", _CHILD, tiny_llama, str(tmp_path)], capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")), None)
    assert proc.returncode == 0 and line, proc.stderr[-3000:]
    assert line.split()[1:] == ["True", "CachedTokenizer", "False", "False", "False"]


def test_structured_output_tokenizer_same_as_from_transformers(entry_tokenizers):
    """llguidance's tokenizer built from the CachedTokenizer (no llguidance.hf / transformers) equals the
    one llguidance.hf builds from transformers' tokenizer."""
    from jaxpaged.structured_output.manager import StructuredOutputManager

    path = entry_tokenizers[1][1]
    ours, hf = load_entry_tokenizer(path), AutoTokenizer.from_pretrained(path, local_files_only=True)
    a = StructuredOutputManager(ours, len(hf) + 64, [2])._build_tokenizer()
    b = StructuredOutputManager(hf, len(hf) + 64, [2])._build_tokenizer()
    assert a.vocab_size == b.vocab_size and a.eos_token == b.eos_token
    for text in TEXTS:
        assert a.tokenize_str(text) == b.tokenize_str(text)
    assert [a.decode_str([i]) for i in range(0, len(hf), 97)] == [b.decode_str([i]) for i in range(0, len(hf), 97)]
