"""The converted-params cache: CLI, hits without reading source weights, new entries for changed sources,
corrupt / half-written entries detected and rebuilt, nothing half-written left behind."""
from __future__ import annotations

import json
import os
import shutil

import ml_dtypes
import numpy as np
import pytest

from jaxpaged.convert import cache, load_model, resolve_model
from jaxpaged.convert import loader as loader_mod
from jaxpaged.convert import safetensors_io
from jaxpaged.convert.__main__ import main as cli_main
from jaxpaged.convert.loader import flatten


@pytest.fixture
def model_dir(tiny_model_factory, tmp_path):
    """A private copy of the tiny llama (tests here modify it)."""
    return shutil.copytree(tiny_model_factory("llama"), tmp_path / "model")


def _forbid_reading_weights(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("source weights were read")
    monkeypatch.setattr(safetensors_io.SafetensorsWeights, "get", boom)
    monkeypatch.setattr(safetensors_io.SafetensorsWeights, "__init__", boom)
    monkeypatch.setattr(loader_mod, "convert_source", boom)


def _entries(root) -> list[str]:
    return sorted(os.listdir(root)) if os.path.isdir(root) else []


def assert_same_params(a: dict, b: dict):
    fa, fb = flatten(a), flatten(b)
    assert set(fa) == set(fb)
    for p in fa:
        assert fa[p].dtype == fb[p].dtype, p
        np.testing.assert_array_equal(fa[p], fb[p], err_msg=p)


def test_cli_writes_entry_and_load_uses_it_without_reading_weights(model_dir, tmp_path, capsys, monkeypatch):
    root = tmp_path / "cache"
    fresh = load_model(str(model_dir), progress=False)
    assert cli_main([str(model_dir), "--cache-dir", str(root), "--no-progress"]) == 0
    entry = capsys.readouterr().out.strip()
    assert os.path.dirname(entry) == str(root) and _entries(root) == [os.path.basename(entry)]
    for name in ("COMPLETE", "model_config.json", "source.json", "params", "tokenizer"):
        assert os.path.exists(os.path.join(entry, name)), name
    assert "-float32-v" in entry

    _forbid_reading_weights(monkeypatch)
    cached = load_model(str(model_dir), cache_dir=str(root))
    assert cached.from_cache and cached.config == fresh.config
    assert_same_params(cached.params, fresh.params)
    text = "The capital of France is Paris. 日本語"
    assert cached.tokenizer(text).input_ids == fresh.tokenizer(text).input_ids
    assert cached.tokenizer.eos_token == fresh.tokenizer.eos_token
    # a second CLI run finds the entry and changes nothing
    assert cli_main([str(model_dir), "--cache-dir", str(root), "--no-progress"]) == 0
    assert capsys.readouterr().out.strip() == entry


def test_env_var_and_bf16_entry(model_dir, tmp_path, monkeypatch):
    root = tmp_path / "envcache"
    monkeypatch.setenv("JAXPAGED_CACHE", str(root))
    assert cache.cache_root() == str(root)
    first = load_model(str(model_dir), dtype="bfloat16", progress=False, write_cache=True)
    assert not first.from_cache and len(_entries(root)) == 1 and "-bfloat16-" in _entries(root)[0]
    again = load_model(str(model_dir), dtype="bfloat16", progress=False)
    assert again.from_cache
    assert flatten(again.params)["layers/q_proj/kernel"].dtype == ml_dtypes.bfloat16
    assert_same_params(again.params, first.params)
    # another dtype is another entry
    assert not load_model(str(model_dir), dtype="float32", progress=False).from_cache


def test_changed_source_gives_new_entry(model_dir, tmp_path):
    root = str(tmp_path / "cache")
    before = load_model(str(model_dir), cache_dir=root, progress=False, write_cache=True)
    key_before = cache.cache_key(resolve_model(str(model_dir)), "float32")
    # replace the weights with different ones of the same shapes (another seed)
    from tests import tiny_models
    tiny_models.make_hf_model("llama", seed=1).save_pretrained(model_dir, safe_serialization=True)
    key_after = cache.cache_key(resolve_model(str(model_dir)), "float32")
    assert key_after != key_before
    after = load_model(str(model_dir), cache_dir=root, progress=False, write_cache=True)
    assert not after.from_cache and len(_entries(root)) == 2
    assert not np.array_equal(flatten(after.params)["embed/embedding"], flatten(before.params)["embed/embedding"])
    # config-only changes (eos ids) count as a change of source too
    gen = os.path.join(model_dir, "generation_config.json")
    json.dump({"bos_token_id": 1, "eos_token_id": [2, 3]}, open(gen, "w"))
    changed = load_model(str(model_dir), cache_dir=root, progress=False, write_cache=True)
    assert not changed.from_cache and changed.config.eos_token_ids == (2, 3)
    assert len(_entries(root)) == 3


def _damage_marker(entry):
    os.remove(os.path.join(entry, "COMPLETE"))


def _damage_params_file(entry):
    data = sorted(os.listdir(os.path.join(entry, "params")))
    assert data and all(f.endswith(".npy") for f in data)
    f = os.path.join(entry, "params", data[len(data) // 2])
    with open(f, "r+b") as fh:      # the header stays readable; the array is cut short
        fh.truncate(max(0, os.path.getsize(f) // 3))


def _remove_params_file(entry):
    os.remove(os.path.join(entry, "params", sorted(os.listdir(os.path.join(entry, "params")))[0]))


def _damage_manifest(entry):
    marker = os.path.join(entry, "COMPLETE")
    m = json.load(open(marker))
    m["params"]["embed/embedding"] = [1, 1]
    json.dump(m, open(marker, "w"))


def _damage_config(entry):
    cfg = json.load(open(os.path.join(entry, "model_config.json")))
    cfg["vocab_size"] = cfg["vocab_size"] + 8  # shapes no longer match the stored arrays
    json.dump(cfg, open(os.path.join(entry, "model_config.json"), "w"))


def _damage_params_dir(entry):
    shutil.rmtree(os.path.join(entry, "params"))


@pytest.mark.parametrize("damage", [_damage_marker, _damage_params_file, _remove_params_file, _damage_manifest,
                                    _damage_config, _damage_params_dir])
def test_corrupt_entry_detected_removed_and_rebuilt(model_dir, tmp_path, damage):
    root = str(tmp_path / "cache")
    good = load_model(str(model_dir), cache_dir=root, progress=False, write_cache=True)
    (entry,) = [os.path.join(root, e) for e in _entries(root)]
    damage(entry)
    rebuilt = load_model(str(model_dir), cache_dir=root, progress=False, write_cache=True)
    assert not rebuilt.from_cache  # never served from the damaged entry
    assert_same_params(rebuilt.params, good.params)
    assert rebuilt.config == good.config
    assert _entries(root) == [os.path.basename(entry)]
    assert load_model(str(model_dir), cache_dir=root, progress=False).from_cache  # the rebuilt one is good


def test_corrupt_entry_removed_even_without_writing(model_dir, tmp_path):
    root = str(tmp_path / "cache")
    load_model(str(model_dir), cache_dir=root, progress=False, write_cache=True)
    _damage_marker(os.path.join(root, _entries(root)[0]))
    m = load_model(str(model_dir), cache_dir=root, progress=False)
    assert not m.from_cache and _entries(root) == []


def test_failed_write_leaves_nothing(model_dir, tmp_path, monkeypatch):
    root = tmp_path / "cache"
    m = load_model(str(model_dir), progress=False)

    def fail(*a, **k):
        raise RuntimeError("disk full")
    monkeypatch.setattr(type(m.tokenizer), "save_pretrained", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        cache.write_entry(str(root), m.source, "float32", m.config, m.params, m.tokenizer)
    assert _entries(root) == []  # no entry and no temp dir


def test_stale_temp_dirs_are_cleaned(model_dir, tmp_path):
    root = tmp_path / "cache"
    stale = root / ".tmp-dead-writer"
    stale.mkdir(parents=True)
    os.utime(stale, (1, 1))
    load_model(str(model_dir), cache_dir=str(root), progress=False, write_cache=True)
    assert not stale.exists() and len(_entries(root)) == 1


def test_gguf_entry_skips_the_gguf(tmp_path, tiny_model_factory, monkeypatch):
    from jaxpaged.convert import gguf_io
    from tests.test_gguf import write_tiny_gguf

    path = write_tiny_gguf(str(tmp_path / "tiny.gguf"), tiny_model_factory("llama_tied"))
    root = str(tmp_path / "cache")
    fresh = load_model(path, cache_dir=root, progress=False, write_cache=True)

    def boom(*a, **k):
        raise AssertionError("GGUF was opened")
    monkeypatch.setattr(gguf_io.GGUFFile, "__init__", boom)
    cached = load_model(path, cache_dir=root, progress=False)
    assert cached.from_cache and cached.config == fresh.config and cached.source.kind == "gguf"
    assert_same_params(cached.params, fresh.params)
    msgs = [{"role": "user", "content": "Hello world! 🙂"}]
    assert cached.tokenizer.apply_chat_template(msgs, tokenize=False) == fresh.tokenizer.apply_chat_template(
        msgs, tokenize=False)
    for text in ["<|im_start|>user\nHi 12345<|im_end|>", "  café  naïve\n"]:
        assert cached.tokenizer(text).input_ids == fresh.tokenizer(text).input_ids
    assert cached.tokenizer.bos_token_id == fresh.tokenizer.bos_token_id


def test_cli_reports_bad_input(tmp_path, capsys):
    assert cli_main([str(tmp_path / "missing"), "--cache-dir", str(tmp_path / "c")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli_main([str(tmp_path), "--dtype", "int8", "--cache-dir", str(tmp_path / "c")]) == 2
    assert "dtype" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "c")
