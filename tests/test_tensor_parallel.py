"""Tensor parallelism (jaxpaged/sharding.py): greedy tokens with TP > 1 equal TP = 1, and params / KV cache
really are split across devices.

Multi-device cases run in a subprocess (tests/tp_worker.py) with XLA_FLAGS=--xla_force_host_platform_device_count
set before JAX starts; the layout helpers are checked in-process on numpy.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxpaged.config import ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = [[5], [7, 8, 9, 10, 11], list(range(20, 37)), [int(x) for x in np.arange(40) * 7 % 300 + 3]]


def run_worker(tmp_path, name: str, timeout: int = 300, **spec) -> dict:
    spec.setdefault("prompts", PROMPTS)
    spec.setdefault("max_tokens", 8)
    spec.setdefault("attention_backend", "jnp")
    spec.setdefault("download_dir", str(tmp_path / "cache"))
    spec_path, out_path = tmp_path / f"{name}.json", tmp_path / f"{name}.out.json"
    spec_path.write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, "-m", "tests.tp_worker", str(spec_path), str(out_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out_path.read_text())


def test_llama_tp2_tp4_equal_tp1_and_params_are_split(tmp_path, tiny_model_factory):
    # 4 query heads, 4 KV heads, vocab 320, intermediate 128: everything divides 2 and 4
    path = tiny_model_factory("llama", num_key_value_heads=4)
    params = ["embed/embedding", "lm_head/kernel", "layers/q_proj/kernel", "layers/k_proj/kernel",
              "layers/o_proj/kernel", "layers/down_proj/kernel", "layers/input_norm/scale"]
    out = run_worker(tmp_path, "llama", devices=4, model=path, tps=[1, 2, 4], params=params)
    assert out["tokens"]["2"] == out["tokens"]["1"]
    assert out["tokens"]["4"] == out["tokens"]["1"]
    for tp in (2, 4):
        s = out["shards"][str(tp)]
        assert s["embed/embedding"] == [[320 // tp, 64]] * tp                  # vocabulary split
        assert s["lm_head/kernel"] == [[64, 320 // tp]] * tp
        assert s["layers/q_proj/kernel"] == [[2, 64, 64 // tp]] * tp           # whole heads (D = 16)
        assert s["layers/k_proj/kernel"] == [[2, 64, 64 // tp]] * tp
        assert s["layers/o_proj/kernel"] == [[2, 64 // tp, 64]] * tp           # row-parallel
        assert s["layers/down_proj/kernel"] == [[2, 128 // tp, 64]] * tp
        assert s["layers/input_norm/scale"] == [[2, 64]] * tp                  # replicated
        assert out["kv_shards"][str(tp)] == [[2, 4 // tp, out_blocks(out), 16, 16]] * tp
    assert out["kv_shards"]["1"] == [[2, 4, out_blocks(out), 16, 16]]


def out_blocks(out) -> int:
    return out["kv_shards"]["1"][0][2]


def test_gpt2_fused_qkv_tp2_tp4_equal_tp1(tmp_path, tiny_model_factory):
    out = run_worker(tmp_path, "gpt2", devices=4, model=tiny_model_factory("gpt2"), tps=[1, 2, 4],
                     params=["layers/qkv/kernel", "layers/qkv/bias", "wte/embedding", "wpe/embedding"])
    assert out["tokens"]["2"] == out["tokens"]["1"]
    assert out["tokens"]["4"] == out["tokens"]["1"]
    s = out["shards"]["4"]
    assert s["layers/qkv/kernel"] == [[2, 64, 48]] * 4     # one head each of q, k and v per device
    assert s["layers/qkv/bias"] == [[2, 48]] * 4
    assert s["wte/embedding"] == [[80, 64]] * 4
    assert s["wpe/embedding"] == [[1024, 64]] * 4          # replicated


@pytest.mark.parametrize("backend", ["pallas", "native"])
def test_tp4_replicates_kv_heads_kernels_under_shard_map(tmp_path, tiny_llama, backend):
    # tiny llama: 4 query heads, 2 KV heads -> TP=4 repeats each KV head twice; attention via the kernels
    # (TP=1 runs the jnp reference: one kernel compile fewer; kernel == reference is test_kernels.py's job)
    out = run_worker(tmp_path, f"llama_kvrep_{backend}", devices=4, model=tiny_llama, tps=[1, 4],
                     attention_backend=["jnp", backend],
                     prompts=PROMPTS[1:3], max_tokens=6, params=["layers/k_proj/kernel"])
    assert out["tokens"]["4"] == out["tokens"]["1"]
    assert out["num_kv_heads"] == {"1": 2, "4": 4}
    assert out["shards"]["4"]["layers/k_proj/kernel"] == [[2, 64, 16]] * 4   # one (copied) KV head each
    assert [s[1] for s in out["kv_shards"]["4"]] == [1, 1, 1, 1]


@pytest.mark.slow
def test_smollm2_tp3_equals_tp1(tmp_path):
    # 9 query heads, 3 KV heads, hidden 576, intermediate 1536, vocab 49152: all split 3 ways
    out = run_worker(tmp_path, "smollm2", devices=3, model="smollm2-135m-instruct", tps=[1, 3],
                     prompts=[[1, 504, 3575, 282, 4649, 314], [1, 563, 11234, 30]],
                     params=["layers/q_proj/kernel", "layers/k_proj/kernel", "layers/gate_proj/kernel",
                             "embed/embedding"])
    assert out["tokens"]["3"] == out["tokens"]["1"]
    s = out["shards"]["3"]
    assert s["layers/q_proj/kernel"] == [[30, 576, 192]] * 3    # 3 heads of 64 per device
    assert s["layers/k_proj/kernel"] == [[30, 576, 64]] * 3     # 1 KV head per device
    assert s["layers/gate_proj/kernel"] == [[30, 576, 512]] * 3
    assert s["embed/embedding"] == [[16384, 576]] * 3
    assert [k[1] for k in out["kv_shards"]["3"]] == [1, 1, 1]


# ---- in-process: layout helpers on numpy ----------------------------------------------------------------


def _cfg(**kw) -> ModelConfig:
    base = dict(model_type="llama", vocab_size=320, hidden_size=64, intermediate_size=128, num_layers=2,
                num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=128)
    return ModelConfig(**{**base, **kw})


def test_head_counts_that_do_not_fit_raise():
    from jaxpaged.sharding import check_divisible
    with pytest.raises(ValueError, match="tensor_parallel_size: 3 must divide the model's 4 attention heads"):
        check_divisible(_cfg(), 3)
    with pytest.raises(ValueError, match="tensor_parallel_size: 4 must divide the model's 3 KV heads"):
        check_divisible(_cfg(num_heads=12, num_kv_heads=3), 4)
    assert check_divisible(_cfg(), 2) == 1
    assert check_divisible(_cfg(), 4) == 2       # 2 KV heads on 4 devices: each repeated twice


def test_more_devices_than_exist_raise():
    import jax

    from jaxpaged.sharding import make_mesh
    assert make_mesh(1) is None
    with pytest.raises(ValueError, match="tensor_parallel_size: .* exceeds"):
        make_mesh(jax.device_count() + 1)


def test_gpt2_qkv_regrouping_gives_each_shard_whole_heads():
    from jaxpaged.sharding import prepare_params
    h, n, layers = 64, 4, 2
    cfg = _cfg(model_type="gpt2", num_kv_heads=4)
    # column c of HF's c_attn: part c // h (q, k, v), head (c % h) // 16
    kernel = np.broadcast_to(np.arange(3 * h, dtype=np.float32), (layers, h, 3 * h)).copy()
    _, out = prepare_params(cfg, {"layers": {"qkv": {"kernel": kernel, "bias": kernel[:, 0]}}}, n)
    cols = out["layers"]["qkv"]["kernel"][0, 0].reshape(n, 3, h // n)     # [shard, part, col]
    for shard in range(n):
        for part in range(3):
            want = part * h + shard * (h // n) + np.arange(h // n)          # shard's heads of that part
            np.testing.assert_array_equal(cols[shard, part], want)
    np.testing.assert_array_equal(out["layers"]["qkv"]["bias"], out["layers"]["qkv"]["kernel"][:, 0])
    assert kernel[0, 0, 1] == 1.0 and prepare_params(cfg, {"x": 1}, 1)[1] == {"x": 1}   # input untouched; N=1 no-op


def test_kv_head_replication_keeps_the_gqa_mapping():
    from jaxpaged.sharding import prepare_params
    cfg = _cfg()                                     # 4 query heads, 2 KV heads, D = 16
    k = np.arange(2 * 64 * 32, dtype=np.float32).reshape(2, 64, 32)
    new_cfg, out = prepare_params(cfg, {"layers": {"k_proj": {"kernel": k}, "v_proj": {"kernel": k}}}, 4)
    assert new_cfg.num_kv_heads == 4
    rep = out["layers"]["k_proj"]["kernel"].reshape(2, 64, 4, 16)
    orig = k.reshape(2, 64, 2, 16)
    for qh in range(4):   # query head qh reads KV head qh // (NH / KVH) before and after
        np.testing.assert_array_equal(rep[:, :, qh // (4 // 4)], orig[:, :, qh // (4 // 2)])


def test_every_sharded_path_exists_in_a_model():
    import jax

    from jax.sharding import PartitionSpec as P

    from jaxpaged.models import abstract_params
    from jaxpaged.sharding import AXIS, param_specs
    for cfg in (_cfg(attention_bias=True), _cfg(model_type="gpt2", num_kv_heads=4, hidden_act="gelu_new")):
        params = abstract_params(cfg)
        paths = {"/".join(str(k.key) for k in kp) for kp, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
        specs = jax.tree_util.tree_leaves(param_specs(cfg, params, 4), is_leaf=lambda s: isinstance(s, P))
        assert len(specs) == len(paths)                       # every leaf gets a spec
        assert set(cfg.family.TP_SPLIT_AXES) <= paths         # the family's table names real params
        assert sum(AXIS in tuple(s) for s in specs) >= 6      # and splits them


def test_tensor_parallel_size_is_a_server_flag():
    from jaxpaged.server.cli import make_parser
    args = make_parser().parse_args(["--tensor-parallel-size", "2"])
    assert args.tensor_parallel_size == 2
