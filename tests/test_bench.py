"""Smoke tests of `python -m jaxpaged.bench` on a tiny random Llama: the subcommands run and print metrics."""
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from jaxpaged.bench.__main__ import main
from jaxpaged.bench.workload import BenchRequest, parse_range, random_requests


def test_workload_ranges_and_seed():
    assert parse_range("32:512") == (32, 512) and parse_range("7") == (7, 7)
    with pytest.raises(ValueError):
        parse_range("9:3")
    a = random_requests(20, (3, 9), (2, 5), vocab_size=320, seed=1)
    assert a == random_requests(20, (3, 9), (2, 5), vocab_size=320, seed=1)
    assert all(3 <= len(r.prompt_token_ids) <= 9 and 2 <= r.max_tokens <= 5 for r in a)
    assert all(100 <= t < 320 for r in a for t in r.prompt_token_ids)


def test_throughput_jaxpaged_and_hf_side_by_side(tiny_llama, tmp_path, capsys):
    out = tmp_path / "tp.jsonl"
    main(["throughput", "--model", tiny_llama, "--backend", "jaxpaged,hf", "--num-prompts", "6",
          "--input-len-range", "4:20", "--output-len-range", "3:6", "--ignore-eos", "--max-num-seqs", "4",
          "--max-num-batched-tokens", "32", "--max-model-len", "64", "--enforce-eager",
          "--profile", "--hf-batch-size", "4", "--download-dir", str(tmp_path), "--output-json", str(out)])
    text = capsys.readouterr().out
    assert "output tok/s" in text and "ratio jaxpaged/hf" in text and "decode-only steps" in text
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["backend"] for r in rows] == ["jaxpaged", "hf"]
    # ignore_eos: both backends produce exactly the requested tokens
    assert rows[0]["output_tokens"] == rows[1]["output_tokens"] == sum(
        r.max_tokens for r in random_requests(6, (4, 20), (3, 6), 320, seed=0))


def test_throughput_sampled_mode(tiny_llama, tmp_path, capsys):
    out = tmp_path / "tp.jsonl"
    main(["throughput", "--model", tiny_llama, "--num-prompts", "4", "--input-len-range", "4:12",
          "--output-len-range", "3:5", "--ignore-eos", "--max-num-seqs", "4", "--max-num-batched-tokens", "32",
          "--max-model-len", "64", "--enforce-eager", "--temperature", "0.8", "--top-p", "0.95", "--top-k", "50",
          "--download-dir", str(tmp_path), "--output-json", str(out)])
    text = capsys.readouterr().out
    assert "'temperature': 0.8, 'top_p': 0.95, 'top_k': 50" in text
    row = json.loads(out.read_text())
    assert row["output_tokens"] == sum(r.max_tokens for r in random_requests(4, (4, 12), (3, 5), 320, seed=0))
    # transformers runs greedy only: a clear refusal, not a silent greedy run
    main(["throughput", "--model", tiny_llama, "--backend", "hf", "--num-prompts", "1", "--temperature", "0.5",
          "--download-dir", str(tmp_path)])
    assert "hf        FAILED" in capsys.readouterr().out


def test_startup_reports_cache_counts(tiny_llama, capsys):
    import os
    # the session's temporary cache root (its cpu_kernels build is shared: no g++ run here)
    main(["startup", "--model", tiny_llama, "--warm-only", "--cache-dir", os.environ["JAXPAGED_CACHE"],
          "--enforce-eager", "--max-num-seqs", "4", "--max-num-batched-tokens", "32", "--max-model-len", "64"])
    text = capsys.readouterr().out
    assert "warm  total" in text and "XLA cache" in text and "weights packed" in text


def test_startup_server_reports_health_first_answer_and_background_warmup(tiny_llama, capsys):
    import os
    import re
    main(["startup", "--model", tiny_llama, "--server", "--warm-only", "--cache-dir", os.environ["JAXPAGED_CACHE"],
          "--max-num-seqs", "4", "--max-num-batched-tokens", "32", "--max-model-len", "64"])
    text = capsys.readouterr().out
    assert re.search(r"/health 200 after +[\d.]+ s, first completion after +[\d.]+ s, "
                     r"background warmup done after +[\d.]+ s", text), text


def test_latency_prints_split(tiny_llama, tmp_path, capsys):
    main(["latency", "--model", tiny_llama, "--batch-sizes", "1,3", "--input-len", "5", "--output-len", "6",
          "--skip", "1", "--max-num-batched-tokens", "32", "--max-model-len", "64",
          "--download-dir", str(tmp_path)])
    text = capsys.readouterr().out
    assert "B=1 " in text and "B=3 " in text and "host" in text and "device" in text
    assert "compiled step executables" in text


def test_kernel_quick(capsys):
    main(["kernel", "--quick"])
    text = capsys.readouterr().out
    assert "attention" in text and "kv_write" in text and "k/ref" in text
    assert "attention native" in text          # the CPU kernel beside the Pallas one


def test_matmul_table(capsys):
    main(["matmul", "--shapes", "64x40", "--rows", "1,5", "--repeats", "1", "--calls", "1", "--quantized",
          "int8,Q4_1"])
    text = capsys.readouterr().out
    assert "caps()" in text
    rows = [line for line in text.splitlines() if line.startswith("| float") or line.startswith("| bfloat")]
    assert len(rows) == 4 and all(line.endswith("x |") for line in rows)     # 2 dtypes x 2 row counts
    quantized = [line for line in text.splitlines() if line.startswith(("| int8 ", "| Q4_1 "))]
    assert len(quantized) == 4 and all(line.endswith("x |") for line in quantized)   # 2 schemes x 2 row counts


def _kernel_repo(path):
    """A one-commit git repository holding this tree's cpu_kernels sources (independent of how the
    tests' own checkout was made: a shallow clone, an export without .git)."""
    from jaxpaged.bench.kernel_at_rev import default_repo
    src = default_repo() / "cpu_kernels"
    (path / "cpu_kernels").mkdir(parents=True)
    for f in [*src.glob("*.cc"), *src.glob("*.h")]:
        shutil.copy(f, path / "cpu_kernels" / f.name)
    git = ["git", "-C", str(path), "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    for args in (["init", "-q"], ["add", "."], ["commit", "-q", "-m", "kernels"]):
        subprocess.run(git + args, check=True, capture_output=True)
    return Path(path)


def test_matmul_against_a_revision_builds_it_and_compares(tmp_path, capsys):
    """`--against REV`: matmul.cc as committed at REV, built apart and registered under its own target,
    runs beside this tree's on the same stacked weights (both dtypes; the run checks that they agree);
    an unknown revision is a ValueError naming the flag."""
    from jaxpaged.bench.kernel_at_rev import compare
    repo = _kernel_repo(tmp_path / "repo")
    compare("HEAD", [(256, 96)], [1, 20], ["float32", "bfloat16"], layers=2, repeats=1, repo=repo)
    text = capsys.readouterr().out
    rows = [line.split("|")[1:-1] for line in text.splitlines() if line.startswith(("| float32", "| bfloat16"))]
    assert len(rows) == 4                                          # 2 dtypes x 2 row counts
    for dtype, shape, m, old, new, ratio in rows:
        old, new, ratio = float(old), float(new), float(ratio)
        assert shape.strip() == "256x96" and old > 0 and new > 0
        # the ratio comes from the unrounded times: it lies within the printed times' rounding (5e-5 ms)
        half = 5e-5
        assert (new - half) / (old + half) - 5e-4 <= ratio <= (new + half) / max(old - half, 1e-9) + 5e-4
    with pytest.raises(ValueError, match="--against"):
        compare("no-such-revision-0123", [(64, 40)], [1], ["float32"], layers=1, repeats=1, repo=repo)
    with pytest.raises(ValueError, match="--against"):
        main(["matmul", "--against", "no-such-revision-0123", "--shapes", "64x40", "--rows", "1"])


def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    from jaxpaged.bench.plot import plot_serve
    stat = dict(mean=1.0, p50=1.0, p99=2.0)
    rows = [dict(rate=r, output_throughput=10.0 * r, ttft_ms=stat, e2e_ms=stat, tpot_ms=stat, itl_ms=stat)
            for r in (1.0, 2.0, float("inf"))]
    rows[-1]["output_throughput"] = 40.0
    plot_serve(rows, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_structured_overhead_smoke(tiny_llama, tmp_path, capsys):
    from jaxpaged.bench.__main__ import main
    main(["structured", "--model", tiny_llama, "--batch-size", "4", "--steps", "3", "--enforce-eager",
          "--download-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "B=4 decode step" in out and "every row constrained" in out


def test_serve_against_named_server_with_api_key(tiny_llama, tmp_path, capsys):
    """A server started with --served-model-name and --api-key: bench serve reads the tokenizer from
    --tokenizer (not from the served name), sends the key, and names the served model in its requests."""
    from tests.server_utils import ServerProcess

    server = ServerProcess(["--model", "fake-model", "--engine-factory", "tests.server_utils:make_fake_engine",
                            "--served-model-name", "smol", "--api-key", "sekret", "--max-model-len", "256"])
    try:
        common = ["serve", "--base-url", server.url, "--tokenizer", tiny_llama, "--num-prompts", "3",
                  "--input-len-range", "4:8", "--output-len-range", "2:3", "--ignore-eos"]
        with pytest.raises(SystemExit, match="--api-key"):
            main(common)
        out = tmp_path / "serve.jsonl"
        main([*common, "--api-key", "sekret", "--output-json", str(out)])
        row = json.loads(out.read_text())
        assert row["completed"] == 3 and row["failed"] == 0, row
        assert "server model smol" in capsys.readouterr().out
        # a served name is not a tokenizer: a clear message, no traceback
        with pytest.raises(SystemExit, match="--served-model-name"):
            main(["serve", "--base-url", server.url, "--model", "smol", "--api-key", "sekret", "--num-prompts", "1"])
    finally:
        server.stop()


def test_memory_breakdown(tiny_llama, tmp_path, capsys):
    from jaxpaged.bench.memory import run
    import argparse
    args = argparse.Namespace(model=tiny_llama, dtype="float32", no_warmup=True, engine_args=json.dumps(dict(
        num_kv_blocks=16, max_model_len=64, max_num_seqs=2, max_num_batched_tokens=32, download_dir=str(tmp_path))))
    r = run(args)
    plan = r["kv_plan"]
    assert r["arrays"]["kv_pool"] == plan["num_blocks"] * plan["bytes_per_block"] == 16 * plan["bytes_per_block"]
    assert r["arrays"]["all live JAX arrays"] >= r["arrays"]["kv_pool"] + r["arrays"]["params (as the runner holds them)"]
    assert set(r["stages"]) == {"runtime", "engine", "serve"} and r["total_rss"] > 0
    assert "| kv_pool |" in capsys.readouterr().out


def test_spec_copy_and_random_workloads_run(tiny_llama, tmp_path, capsys):
    out = tmp_path / "spec.jsonl"
    common = ["--model", tiny_llama, "--batch-sizes", "1,2", "--rounds", "2", "--max-model-len", "1024",
              "--max-num-batched-tokens", "64", "--enforce-eager", "--download-dir", str(tmp_path),
              "--output-json", str(out)]
    main(["spec", "--workload", "copy", "--max-tokens", "8"] + common)
    main(["spec", "--workload", "random", "--input-len-range", "4:12", "--output-len-range", "6", "--ignore-eos"]
         + common)
    text = capsys.readouterr().out
    assert "B=1 " in text and "B=2 " in text and "identical outputs: True" in text
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["workload"], r["batch_size"]) for r in rows] == [("copy", 1), ("copy", 2), ("random", 1), ("random", 2)]
    assert all(r["identical"] for r in rows) and rows[-1]["output_tokens"] == 24 and rows[-1]["num_requests"] == 4


def test_latency_ops_prints_per_op_profile(tiny_llama, tmp_path, capsys):
    """--ops: the captured steps' XLA ops from a profiler trace, labelled from the compiled HLO."""
    from jaxpaged.bench.op_profile import hlo_labels
    main(["latency", "--model", tiny_llama, "--batch-sizes", "3", "--input-len", "5", "--output-len", "6",
          "--skip", "1", "--max-num-batched-tokens", "32", "--max-model-len", "64", "--ops", "5",
          "--download-dir", str(tmp_path)])
    text = capsys.readouterr().out
    assert "per-op profile, decode step" in text
    rows = [line.split() for line in text.split("per-op profile, decode step")[1].splitlines()[2:7]]
    assert len(rows) == 5 and all(float(r[0]) >= 0 and r[1].endswith("x") for r in rows)
    assert [float(r[0]) for r in rows] == sorted((float(r[0]) for r in rows), reverse=True)
    assert any("[" in " ".join(r[3:]) for r in rows)          # labelled with an output shape
    labels = hlo_labels('  %ffi_call.3 = f32[4,8]{1,0} custom-call(%a), custom_call_target="jaxpaged_matmul"\n'
                        '  ROOT %fusion.2 = f32[4]{0} fusion(%b), kind=kLoop\n')
    assert labels == {"ffi_call.3": "f32[4,8]{1,0} jaxpaged_matmul", "fusion.2": "f32[4]{0}"}
