"""GGUF: tensors, config and tokenizer equal what transformers builds from the same file.

Tiny GGUFs are written here from the tiny HF models (with llama.cpp's Q/K permutation applied, the way
its converter does); the real SmolLM2 GGUF is compared against transformers' own GGUF loading.
"""
from __future__ import annotations

import functools
import json
import os

import gguf

import numpy as np
import pytest

from jaxpaged.convert import load_model
from jaxpaged.convert.gguf_io import GGUFFile, unpermute_qk
from jaxpaged.convert.loader import flatten
from tests import tiny_models

TEXTS = [
    "The capital of France is Paris.",
    "  leading spaces,\n\n\ttabs\t and   runs of     spaces  \n",
    "Unicode: café, naïve, 日本語, emoji 🙂👍🏽, Ελληνικά, عربى",
    "Numbers 0 12 345 6789 3.14159 1,000,000 2024-01-31 0x1F",
    "don't I'll WE'RE you've it's",
    "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n",
    "code: def f(x):\n    return x**2  # comment\r\n",
    "",
]
MESSAGES = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is 2+2? Answer with digits 🙂"},
            {"role": "assistant", "content": "4"}, {"role": "user", "content": "  and 3+3?  "}]


# ----------------------------------------------------------------------------- writing tiny GGUFs

def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter permutation (HF rotate-half rows -> interleaved pairs), for writing GGUFs."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tokenizer_metadata(hf_dir: str) -> dict:
    """tokens (by id), merges, token types and special ids of a tiny HF tokenizer.json."""
    tj = json.load(open(os.path.join(hf_dir, "tokenizer.json")))
    vocab = dict(tj["model"]["vocab"])
    for added in tj["added_tokens"]:
        vocab[added["content"]] = added["id"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = {a["content"] for a in tj["added_tokens"] if a["special"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    return {"tokens": tokens, "merges": merges, "types": [3 if t in special else 1 for t in tokens],
            "ids": {t: i for i, t in enumerate(tokens)}}


def write_tiny_gguf(path: str, hf_dir: str, arch: str = "llama", quantize: bool = False,
                    tokenizer_model: str = "gpt2", extra_tensors: dict | None = None) -> str:
    """A llama-architecture GGUF holding a tiny HF llama's weights and tokenizer."""
    import gguf
    from safetensors import safe_open

    cfg = json.load(open(os.path.join(hf_dir, "config.json")))
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg.get("rope_theta", 10000.0))
    w.add_vocab_size(cfg["vocab_size"])
    tok = tokenizer_metadata(hf_dir)
    w.add_tokenizer_model(tokenizer_model)
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tok["tokens"])
    w.add_token_merges(tok["merges"])
    w.add_token_types(tok["types"])
    w.add_bos_token_id(tok["ids"]["<s>"])
    w.add_eos_token_id(tok["ids"]["</s>"])
    w.add_unk_token_id(tok["ids"]["<unk>"])
    w.add_pad_token_id(tok["ids"]["<unk>"])
    w.add_add_bos_token(True)
    w.add_chat_template(tiny_models.CHAT_TEMPLATE)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    parts = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    with safe_open(os.path.join(hf_dir, "model.safetensors"), "numpy") as f:
        for name in f.keys():
            t = f.get_tensor(name).astype(np.float32)
            if name in names:
                gname = names[name]
            else:
                _, _, layer, rest = name.split(".", 3)
                part, kind = rest.rsplit(".", 1)
                gname = f"blk.{layer}.{parts[part]}.{kind}"
            if ".attn_q." in gname:
                t = permute_qk(t, heads)
            elif ".attn_k." in gname:
                t = permute_qk(t, kv_heads)
            if quantize and t.ndim == 2:
                q = gguf.quants.quantize(t, gguf.GGMLQuantizationType.Q8_0)
                w.add_tensor(gname, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            else:
                w.add_tensor(gname, t)
    for gname, t in (extra_tensors or {}).items():
        w.add_tensor(gname, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tiny_model_factory, tmp_path_factory):
    def make(kind="llama", **kw):
        path = str(tmp_path_factory.mktemp("gguf") / f"{kw.get('arch', 'llama')}-{kind}.gguf")
        return write_tiny_gguf(path, tiny_model_factory(kind), **kw)
    return make


# ----------------------------------------------------------------------------- tiny GGUFs

def test_unpermute_inverts_llama_cpp_permutation():
    w = np.arange(4 * 8 * 3, dtype=np.float32).reshape(4 * 8, 3)
    assert not np.array_equal(permute_qk(w, 4), w)
    np.testing.assert_array_equal(unpermute_qk(permute_qk(w, 4), 4), w)
    b = np.arange(2 * 16, dtype=np.float32)
    np.testing.assert_array_equal(unpermute_qk(permute_qk(b, 2), 2), b)


@pytest.mark.parametrize("kind", ["llama", "llama_tied"])
def test_tiny_gguf_equals_hf_checkpoint(tiny_gguf, tiny_model_factory, kind):
    hf = load_model(tiny_model_factory(kind), progress=False)
    gg = load_model(tiny_gguf(kind), progress=False)
    assert gg.source.kind == "gguf"
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                  "head_dim", "max_position_embeddings", "tie_word_embeddings", "bos_token_id", "eos_token_ids"):
        assert getattr(gg.config, field) == getattr(hf.config, field), field
    assert gg.config.rope_theta == hf.config.rope_theta
    assert gg.config.norm_eps == pytest.approx(hf.config.norm_eps)
    a, b = flatten(hf.params), flatten(gg.params)
    assert set(a) == set(b)
    for p in a:
        np.testing.assert_array_equal(b[p], a[p], err_msg=p)


def test_tiny_gguf_quantized_q8_0(tiny_gguf, tiny_model_factory):
    hf = flatten(load_model(tiny_model_factory("llama"), progress=False).params)
    gg = flatten(load_model(tiny_gguf("llama", quantize=True), progress=False).params)
    for p in hf:
        np.testing.assert_allclose(gg[p], hf[p], atol=3e-3, err_msg=p)
    assert not np.array_equal(gg["layers/q_proj/kernel"], hf["layers/q_proj/kernel"])  # really quantized


def test_tiny_gguf_tokenizer_equals_original(tiny_gguf, tiny_model_factory):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(tiny_model_factory("llama"))
    tok = load_model(tiny_gguf("llama"), progress=False).tokenizer
    for text in TEXTS:
        ids = tok(text, add_special_tokens=False).input_ids
        assert ids == ref(text, add_special_tokens=False).input_ids, text
        assert tok.decode(ids) == text
    assert tok("hi").input_ids[0] == tok.bos_token_id == 1  # add_bos_token = True in this file
    assert (tok.bos_token, tok.eos_token, tok.unk_token) == ("<s>", "</s>", "<unk>")
    assert tok.apply_chat_template(MESSAGES, tokenize=False) == ref.apply_chat_template(MESSAGES, tokenize=False)


def test_gguf_unsupported_architecture(tiny_gguf):
    path = tiny_gguf("llama", arch="mamba")
    with pytest.raises(ValueError, match=r"mamba-llama\.gguf: GGUF architecture 'mamba' is not supported; supported: \['llama'\]"):
        load_model(path, progress=False)


def test_gguf_unsupported_tokenizer_model(tiny_gguf):
    with pytest.raises(ValueError, match=r"tokenizer\.ggml\.model = 'llama' is not supported; supported: \['gpt2'\]"):
        load_model(tiny_gguf("llama", tokenizer_model="llama"), progress=False)


def test_gguf_rope_freqs_rejected(tiny_gguf):
    path = tiny_gguf("llama", extra_tensors={"rope_freqs.weight": np.ones(8, np.float32)})
    with pytest.raises(ValueError, match="rope_freqs"):
        load_model(path, progress=False)


def test_truncated_gguf(tiny_gguf, tmp_path):
    src = tiny_gguf("llama")
    data = open(src, "rb").read()
    for keep in (len(data) - 100, 200):
        bad = tmp_path / f"cut{keep}.gguf"
        bad.write_bytes(data[:keep])
        with pytest.raises(ValueError, match=rf"cut{keep}\.gguf.*(truncated|corrupt)"):
            load_model(str(bad), progress=False)


# ----------------------------------------------------------------------------- the real SmolLM2

@pytest.fixture(scope="module")
def smollm2_hf_dir(smollm2_gguf, tmp_path_factory):
    """A directory holding (a link to) the GGUF, the layout transformers' gguf_file= loading wants."""
    d = tmp_path_factory.mktemp("smollm2")
    os.symlink(smollm2_gguf, d / "model.gguf")
    return str(d)


@pytest.fixture(scope="module")
def smollm2():
    """Ours: the built-in model through load_model (one pass over the GGUF)."""
    return load_model("smollm2-135m-instruct", progress=False)


def test_smollm2_tensors_and_config_equal_transformers(smollm2_gguf, smollm2, monkeypatch):
    """Every param equals transformers' dequantized, un-permuted GGUF tensor (torch: test only).

    transformers' `from_pretrained(gguf_file=...)` also wants `accelerate`; its tensor step,
    `load_gguf_checkpoint` with a (meta-device) model to map names onto, is the same code without it.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from tests.test_convert import expected_params

    # transformers rebuilds gguf's (pure) name table once per module, ~400 times; memoize it for speed
    monkeypatch.setattr(gguf, "get_tensor_name_map", functools.lru_cache(maxsize=None)(gguf.get_tensor_name_map))
    c = smollm2.config
    with torch.device("meta"):  # only its parameter names are used, to name the GGUF tensors
        model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=c.num_layers, tie_word_embeddings=True))
    parsed = load_gguf_checkpoint(smollm2_gguf, return_tensors=True, model_to_load=model)
    want, ref = parsed["tensors"], parsed["config"]
    assert len(want) == 272
    assert (c.model_type, c.vocab_size, c.hidden_size, c.intermediate_size, c.num_layers, c.num_heads,
            c.num_kv_heads, c.max_position_embeddings, c.tie_word_embeddings) == (
        ref["model_type"], ref["vocab_size"], ref["hidden_size"], ref["intermediate_size"],
        ref["num_hidden_layers"], ref["num_attention_heads"], ref["num_key_value_heads"],
        ref["max_position_embeddings"], ref["tie_word_embeddings"])
    assert c.head_dim == ref["hidden_size"] // ref["num_attention_heads"] == 64
    assert c.norm_eps == pytest.approx(ref["rms_norm_eps"])
    assert c.rope_theta == pytest.approx(ref["rope_theta"])
    assert c.eos_token_ids == (2,) and c.bos_token_id == 1 and ref["eos_token_id"] == 2
    got = flatten(smollm2.params)
    expected = expected_params(c, {k: v.numpy() for k, v in want.items()})
    assert set(got) == set(expected) and "lm_head/kernel" not in got
    for p in expected:
        np.testing.assert_array_equal(got[p], expected[p], err_msg=p)


def test_smollm2_tokenizer_equals_transformers(smollm2_hf_dir, smollm2):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(smollm2_hf_dir, gguf_file="model.gguf")
    tok = smollm2.tokenizer
    assert len(tok) == len(ref) == 49152
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (
        ref.bos_token_id, ref.eos_token_id, ref.pad_token_id, ref.unk_token_id) == (1, 2, 2, 0)
    chat = ref.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) == chat
    assert chat.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    for text in TEXTS + [chat, "<repo_name>x<file_sep>y<|endoftext|>"]:
        ids = tok(text).input_ids
        assert ids == ref(text).input_ids, text
        assert tok.decode(ids) == ref.decode(ids) == text
        assert tok.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
    ids = tok(chat).input_ids
    assert ids[0] == 1 and ids.count(2) == 4  # <|im_start|> / <|im_end|> stay single tokens
    assert tok.convert_ids_to_tokens(ids[:3]) == ref.convert_ids_to_tokens(ids[:3])
