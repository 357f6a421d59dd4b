"""`bench gpu-check` without a GPU (it must stop at once, saying why) and its paper estimates."""
from __future__ import annotations

import types

import pytest

from jaxpaged.bench.__main__ import main
from jaxpaged.bench.gpu_check import write_report
from pallas_kernels.gpu_estimate import decode_case, estimate, hbm_peak_gbps


def test_gpu_check_fails_clearly_without_a_gpu(tmp_path):
    out = tmp_path / "report.md"
    with pytest.raises(SystemExit) as e:
        main(["gpu-check", "--out", str(out), "--skip-tests", "--skip-e2e"])
    assert "needs a CUDA GPU" in str(e.value.code)
    assert not out.exists()


def test_estimate_and_report(tmp_path):
    # Llama-3-8B decode, batch 1 x 32k, bf16: K + V = 2 * 32768 * 8 heads * 128 * 2 bytes
    e = estimate(*decode_case(1, 32768), num_heads=32, num_kv_heads=8, head_dim=128)
    assert e.kv_bytes == 134217728 and e.kv_splits == 64 and e.programs == 8 * (1 + 64)
    assert e.iterations == 8 and e.bytes > e.kv_bytes
    assert hbm_peak_gbps("NVIDIA H200") == 4800.0 and hbm_peak_gbps("Some GPU") is None
    row = dict(case="decode B=1 ctx=32768", ms=0.05, gbps=2700.0, pct_peak=56.0, tflops=1.0, programs=e.programs,
               kv_splits=64, iterations=8, mbytes=e.bytes / 1e6, ideal_us=e.ideal_us(4800.0))
    path = tmp_path / "r.md"
    write_report(str(path), types.SimpleNamespace(device_kind="NVIDIA H200"), 4800.0,
                 dict(ok=True, seconds=1.0, tail="3 passed"), [row], None)
    text = path.read_text()
    assert "| decode B=1 ctx=32768 | 0.050 | 2700 | 56.0 |" in text and "GPU tests: PASS" in text
    assert (tmp_path / "r.json").exists()


def test_gpu_check_dry_run_writes_the_report(tmp_path):
    """--dry-run goes through the kernel stage on CPU (interpret mode, small shapes): every row is
    timed, none failed, and the report and its JSON are written."""
    import json
    out = tmp_path / "dry" / "report.md"
    main(["gpu-check", "--dry-run", "--skip-tests", "--skip-e2e", "--kernels", "triton", "--out", str(out)])
    rows = json.loads((tmp_path / "dry" / "report.json").read_text())["attention"]
    assert [r["case"] for r in rows] == ["triton: decode B=2 ctx=300", "triton: prefill 96 @ ctx 200"]
    assert all(r["ms"] > 0 and "error" not in r for r in rows)
    assert "| triton: decode B=2 ctx=300 |" in out.read_text()


def test_gpu_check_rejects_bad_options(tmp_path):
    from jaxpaged.bench.gpu_check import parse_variants
    assert parse_variants("3:1, 4:2:32") == [(3, 1, None), (4, 2, 32)]
    with pytest.raises(SystemExit, match="STAGES:COMPUTE_WGS"):
        parse_variants("4")
    with pytest.raises(SystemExit, match="this jax line has"):
        main(["gpu-check", "--dry-run", "--skip-tests", "--skip-e2e", "--kernels", "cuda", "--out", str(tmp_path / "r.md")])


def test_random_model_converts_like_a_checkpoint(tmp_path, tiny_llama):
    """`bench random-model`: a SmolLM2-shaped Llama checkpoint of random bf16 weights that the
    converter reads like a real one (shapes from the published config; the tokenizer copied)."""
    import numpy as np
    from jaxpaged.bench.random_model import SHAPES, tensor_shapes, write_random_model
    from jaxpaged.convert import load_model
    path = write_random_model(str(tmp_path / "m"), "smollm2-135m", tokenizer=tiny_llama)
    m = load_model(path, dtype="bfloat16", progress=False)
    cfg = SHAPES["smollm2-135m"]
    assert (m.config.num_layers, m.config.hidden_size, m.config.num_heads, m.config.num_kv_heads) == (
        cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"])
    assert m.config.vocab_size == len(m.tokenizer)           # the tokenizer's size, not SmolLM2's 49152
    n = sum(int(np.prod(s)) for s in tensor_shapes(dict(cfg, vocab_size=m.config.vocab_size)).values())
    assert sum(int(np.prod(x.shape)) for x in _leaves(m.params)) == n
    with pytest.raises(ValueError, match="no tokenizer.json"):
        write_random_model(str(tmp_path / "bad"), "smollm2-135m", tokenizer=str(tmp_path))


def _leaves(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _leaves(v)
    else:
        yield tree
