"""`python -m jaxpaged.bench load` against a live server on FakeEngine: every request is answered or
aborted as planned, no errors, the KV cache is empty afterwards, and the server's RSS is reported."""
from __future__ import annotations

import json

from jaxpaged.bench.__main__ import main
from jaxpaged.bench.load import build_load
from tests.server_utils import ServerProcess


def test_build_load_is_seeded_and_aborts_before_the_end():
    a = build_load(200, (2, 6), (3, 9), abort_fraction=0.3, seed=4)
    assert a == build_load(200, (2, 6), (3, 9), abort_fraction=0.3, seed=4)
    aborted = [r for r in a if r.abort_after is not None]
    assert 30 <= len(aborted) <= 90
    assert all(1 <= r.abort_after < r.max_tokens for r in aborted)
    assert all(3 <= r.max_tokens <= 9 and 2 <= len(r.prompt.split()) - 2 <= 6 for r in a)


def test_load_against_a_live_server(tmp_path, capsys):
    server = ServerProcess(["--model", "fake-model", "--engine-factory", "tests.server_utils:make_fake_engine",
                            "--max-model-len", "128", "--max-num-seqs", "4"])
    try:
        out = tmp_path / "load.jsonl"
        args = ["load", "--base-url", server.url, "--concurrency", "6", "--num-requests", "16",
                "--abort-fraction", "0.5", "--input-len-range", "2:6", "--output-len-range", "4:12",
                "--seed", "1", "--output-json", str(out)]
        main(args)
        main(args[:-2] + ["--endpoint", "completions"])
    finally:
        server.stop()
    planned_aborts = sum(r.abort_after is not None for r in build_load(16, (2, 6), (4, 12), 0.5, seed=1))
    assert 0 < planned_aborts < 16
    report = json.loads(out.read_text().splitlines()[0])
    assert report["errors"] == 0 and report["rejected"] == 0, report
    assert report["aborted"] == planned_aborts and report["answered"] == 16 - planned_aborts
    assert report["blocks_freed"] and report["kv_usage_after"] == 0.0 and report["running_after"] == 0
    assert report["rss_mb_peak"] > 0 and report["rss_mb_after"] > 0 and report["output_tokens_answered"] > 0
    text = capsys.readouterr().out
    assert text.count("all blocks freed") == 2 and "0 errors" in text and "server RSS" in text
