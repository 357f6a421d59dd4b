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
