"""PEFT adapter loading (jaxpaged/lora/peft_loader.py) and LoRA admission in the scheduler: no engine, no jax step."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file

from jaxpaged.config import ModelConfig
from jaxpaged.lora.peft_loader import load_peft_adapter
from jaxpaged.lora.registry import LoRARegistry
from jaxpaged.lora.request import LoRARequest
from jaxpaged.scheduler import Scheduler
from jaxpaged.sequence import Sequence
from tests.lora_utils import make_adapter


@pytest.fixture(scope="module")
def llama(tiny_model_factory, tmp_path_factory):
    model = tiny_model_factory("llama")
    path = make_adapter(model, str(tmp_path_factory.mktemp("ad") / "a"), r=4, alpha=8,
                        targets=("q_proj", "down_proj"), seed=0)
    with open(f"{model}/config.json") as f:
        return ModelConfig.from_hf_config(json.load(f)), path


def _variant(src: str, dst, **changes) -> str:
    shutil.copytree(src, dst)
    with open(f"{dst}/adapter_config.json") as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(f"{dst}/adapter_config.json", "w") as f:
        json.dump(cfg, f)
    return str(dst)


def test_arrays_are_transposed_scaled_padded_and_zero_elsewhere(llama):
    cfg, path = llama
    ad = load_peft_adapter(path, cfg, max_rank=8)
    raw = load_file(f"{path}/adapter_model.safetensors")
    a, b = ad.arrays["layers/q_proj"]
    assert a.shape == (2, 64, 8) and b.shape == (2, 8, 64)
    name = "base_model.model.model.layers.1.self_attn.q_proj.lora_{}.weight"
    np.testing.assert_array_equal(a[1, :, :4], raw[name.format("A")].T)
    np.testing.assert_allclose(b[1, :4], raw[name.format("B")].T * 2.0, rtol=1e-6)     # alpha / r = 8 / 4
    assert not a[:, :, 4:].any() and not b[:, 4:].any()                                 # rank padding
    assert not ad.arrays["layers/k_proj"][0].any() and not ad.arrays["layers/k_proj"][1].any()
    assert ad.rank == 4 and ad.target_modules == ("mlp.down_proj", "self_attn.q_proj")


@pytest.mark.parametrize("changes, match", [
    (dict(use_dora=True), "use_dora"),
    (dict(bias="all"), "bias"),
    (dict(modules_to_save=["lm_head"]), "modules_to_save"),
    (dict(target_modules=["q_proj", "embed_tokens"]), "target_modules: 'embed_tokens'"),
    (dict(peft_type="IA3"), "peft_type"),
    (dict(r=8), "r: adapter_config.json says 8"),
])
def test_unsupported_configs_are_value_errors(llama, tmp_path, changes, match):
    cfg, path = llama
    with pytest.raises(ValueError, match=match):
        load_peft_adapter(_variant(path, tmp_path / "v", **changes), cfg, max_rank=8)


def test_rank_shapes_and_paths_are_checked(llama, tiny_model_factory, tmp_path):
    cfg, path = llama
    with pytest.raises(ValueError, match="max_lora_rank: the adapter's rank 4"):
        load_peft_adapter(path, cfg, max_rank=2)
    wide = tiny_model_factory("llama", hidden_size=32, intermediate_size=64)
    other = make_adapter(wide, str(tmp_path / "wide"), r=2, alpha=2, targets=("q_proj",), seed=0)
    with pytest.raises(ValueError, match="do not fit the base layer"):
        load_peft_adapter(other, cfg, max_rank=8)
    gpt2 = make_adapter(tiny_model_factory("gpt2"), str(tmp_path / "g"), r=2, alpha=2, targets=("c_attn",), seed=0)
    with pytest.raises(ValueError, match="target_modules: 'c_attn'"):
        load_peft_adapter(gpt2, cfg, max_rank=8)
    with pytest.raises(ValueError, match="no adapter_config.json"):
        load_peft_adapter(str(tmp_path), cfg, max_rank=8)


def test_registry_shares_loads_by_id(llama):
    cfg, path = llama
    reg = LoRARegistry(cfg, max_lora_rank=8)
    one = reg.add(LoRARequest("a", 1, path))
    assert reg.add(LoRARequest("a", 1, path)) is one
    with pytest.raises(ValueError, match="lora_name: 'a' is already loaded"):
        reg.add(LoRARequest("a", 2, path))
    assert reg.remove(1) and reg.add(LoRARequest("a", 1, path)).key != one.key


class _Lora:
    def __init__(self, key):
        self.key = key


def test_scheduler_admits_at_most_max_loras_distinct_adapters():
    sched = Scheduler(num_blocks=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=64,
                      max_loras=1)
    seqs = [Sequence(f"s{i}", [1, 2, 3]) for i in range(4)]
    for s, key in zip(seqs, (1, 2, None, 1)):
        s.lora = _Lora(key) if key else None
        sched.add_sequence(s)
    out = sched.schedule()
    # adapter 2 has no slot while adapter 1 runs: s1 waits, the base and adapter-1 rows behind it go on
    assert [x.seq.seq_id for x in out.scheduled] == ["s0", "s2", "s3"]
    assert [s.seq_id for s in sched.waiting] == ["s1"]
    sched.update_from_output(out)
    sched.finish_sequence("s0", seqs[0].status.FINISHED_STOPPED)
    sched.finish_sequence("s3", seqs[0].status.FINISHED_STOPPED)
    assert [x.seq.seq_id for x in sched.schedule().scheduled if x.start == 0] == ["s1"]
