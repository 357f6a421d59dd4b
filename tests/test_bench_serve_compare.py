"""`bench serve --backend A,B`: the side-by-side table and ratios, the servers' command lines, and a launched
server's lifetime (always stopped, whole process group; its log kept only on failure). vLLM itself is not run."""
import os
import sys
import textwrap

import pytest

from jaxpaged.bench import serve_compare
from jaxpaged.bench.serve_launch import LaunchedServer, ServerSpec, jaxpaged_command, vllm_command
from tests.server_utils import free_port


def _summary(rate, ttft, tpot, itl=(10.0, 20.0), tok_s=50.0):
    st = lambda p50, p99: dict(mean=p50, p50=p50, p99=p99)     # noqa: E731
    return dict(rate=rate, completed=4, failed=0, request_throughput=0.5, output_throughput=tok_s,
                ttft_ms=st(*ttft), tpot_ms=st(*tpot), itl_ms=st(*itl))


INF = float("inf")
RESULTS = {"jaxpaged": [_summary(1.0, (100, 300), (40, 60)), _summary(INF, (900, 2000), (80, 120))],
           "vllm": [_summary(1.0, (200, 400), (50, 70)), _summary(INF, (600, 1500), (100, 150))]}


def test_ratios_are_first_backend_over_the_other_per_rate():
    rs = serve_compare.ratios(RESULTS)
    assert [(r["rate"], r["pair"]) for r in rs] == [(1.0, "jaxpaged/vllm"), (INF, "jaxpaged/vllm")]
    assert rs[0]["ttft"] == pytest.approx(0.5) and rs[0]["tpot"] == pytest.approx(0.8)
    assert rs[1]["ttft"] == pytest.approx(1.5) and rs[1]["tpot"] == pytest.approx(0.8)
    # a backend with no successful request has no p50: no ratio, and the verdict says so
    missing = {"jaxpaged": [_summary(1.0, (100, 300), (40, 60))],
               "vllm": [dict(_summary(1.0, (1, 1), (1, 1)), ttft_ms=dict(mean=None, p50=None, p99=None))]}
    assert serve_compare.ratios(missing)[0]["ttft"] is None
    assert "TTFT n/a" in serve_compare.verdict(missing)
    with pytest.raises(ValueError, match="different rates"):
        serve_compare.ratios({"a": [_summary(1.0, (1, 1), (1, 1))], "b": [_summary(2.0, (1, 1), (1, 1))]})


def test_table_has_a_row_per_rate_and_backend_and_a_ratio_row():
    lines = serve_compare.format_table(RESULTS).splitlines()
    assert lines[0].startswith("| rate (req/s) | backend |") and len(lines) == 2 + 2 * 3
    assert lines[2] == "| 1 | jaxpaged | 4/0 | 0.50 | 50.0 | 100 / 300 | 40 / 60 | 10 / 20 | | |"
    assert lines[3] == "| 1 | vllm | 4/0 | 0.50 | 50.0 | 200 / 400 | 50 / 70 | 10 / 20 | | |"
    assert lines[4] == "| 1 | jaxpaged/vllm | | | | | | | 0.50x | 0.80x |"
    assert lines[7] == "| inf | jaxpaged/vllm | | | | | | | 1.50x | 0.80x |"
    assert all(line.count("|") == 11 for line in lines)
    assert serve_compare.verdict(RESULTS) == "jaxpaged p50 TTFT or TPOT worse (or missing) at rate inf (jaxpaged/vllm: TTFT 1.50x)"
    better = {"jaxpaged": RESULTS["jaxpaged"][:1], "vllm": RESULTS["vllm"][:1]}
    assert serve_compare.verdict(better).startswith("jaxpaged p50 TTFT and TPOT no worse")


def test_both_servers_get_the_same_engine_settings():
    spec = ServerSpec(model="smollm2-135m-instruct", port=8123, dtype="bfloat16", max_model_len=2048,
                      max_num_seqs=32, max_num_batched_tokens=256, kv_cache_space_gib=1.5, seed=3)
    jp, jp_env = jaxpaged_command(spec, python="PY")
    vl, vl_env = vllm_command(spec, "/venv/bin/python", "/cache/hf-dir")
    assert jp[:3] == ["PY", "-m", "jaxpaged.server"] and jp_env == {}
    assert vl[:5] == ["/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server", "--model", "/cache/hf-dir"]

    def flags(cmd):
        return {cmd[i]: cmd[i + 1] for i in range(len(cmd) - 1) if cmd[i].startswith("--")}
    for f, v in {"--port": "8123", "--host": "127.0.0.1", "--dtype": "bfloat16", "--max-model-len": "2048",
                 "--max-num-seqs": "32", "--max-num-batched-tokens": "256", "--seed": "3"}.items():
        assert flags(jp)[f] == v and flags(vl)[f] == v, f
    # the same KV cache size, each in its own way; vLLM pinned to both cores, away from this checkout
    assert flags(jp)["--kv-cache-memory-bytes"] == "1.5GiB" and vl_env["VLLM_CPU_KVCACHE_SPACE"] == "1.5"
    assert vl_env["OMP_NUM_THREADS"] == "2" and vl_env["VLLM_CPU_OMP_THREADS_BIND"] == "0-1"
    assert vl_env["PYTHONPATH"] is None
    assert flags(vl)["--served-model-name"] == "smollm2-135m-instruct"
    extra = ServerSpec(model="m", port=1, extra_args=("--max-num-seqs", "8"))
    assert jaxpaged_command(extra)[0][-2:] == ["--max-num-seqs", "8"]     # last wins in argparse
    # unset fields (bench load/serve --launch): the server's own defaults, nothing passed
    bare, _ = jaxpaged_command(ServerSpec(model="m", port=1), python="PY")
    assert bare == ["PY", "-m", "jaxpaged.server", "--model", "m", "--host", "127.0.0.1", "--port", "1",
                    "--uvicorn-log-level", "warning"]


# a stand-in server: answers /health, writes a line to its log, forks a child (like vLLM's engine core)
_FAKE = textwrap.dedent("""
    import http.server, subprocess, sys
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    open(sys.argv[2], "w").write(str(child.pid))
    print("fake server up", flush=True)
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200); self.end_headers()
        def log_message(self, *a): pass
    http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
""")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:      # a zombie (exited, not yet reaped by init) is not alive
        return f.read().split(")")[-1].split()[0] != "Z"


def test_launched_server_group_is_killed_and_log_kept_on_error(tmp_path, capsys):
    port, script, child_file = free_port(), tmp_path / "fake.py", tmp_path / "child.pid"
    script.write_text(_FAKE)
    cmd = [sys.executable, str(script), str(port), str(child_file)]
    url = f"http://127.0.0.1:{port}"
    with LaunchedServer(cmd, {}, url, name="fake") as server:     # a clean run: log deleted
        log = server.log_path
    assert not os.path.exists(log) and server.proc.returncode is not None
    assert not _alive(int(child_file.read_text()))
    with pytest.raises(KeyboardInterrupt):
        with LaunchedServer(cmd, {}, url, name="fake") as server:
            leader, child = server.proc.pid, int(child_file.read_text())
            raise KeyboardInterrupt       # Ctrl-C mid-run
    assert not _alive(leader) and not _alive(child)
    assert "fake server up" in open(server.log_path).read()
    assert f"fake server log kept in {server.log_path}" in capsys.readouterr().err
    os.unlink(server.log_path)


def test_sigterm_to_the_bench_stops_the_server(tmp_path):
    """`timeout` / `kill` on the bench process: the server (its own session) is stopped, not orphaned."""
    import signal
    import subprocess

    from tests.server_utils import REPO_ROOT, wait_for
    port, script, child_file = free_port(), tmp_path / "fake.py", tmp_path / "child.pid"
    script.write_text(_FAKE)
    bench = tmp_path / "bench.py"
    bench.write_text(textwrap.dedent(f"""
        import sys, time
        from jaxpaged.bench.serve_launch import LaunchedServer
        with LaunchedServer([sys.executable, {str(script)!r}, "{port}", {str(child_file)!r}], {{}},
                            "http://127.0.0.1:{port}", name="fake") as s:
            print(s.proc.pid, flush=True)
            time.sleep(600)
    """))
    proc = subprocess.Popen([sys.executable, str(bench)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=REPO_ROOT)
    leader = int(proc.stdout.readline())
    child = int(child_file.read_text())
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    wait_for(lambda: not _alive(leader) and not _alive(child), timeout=30, what="server group gone")
    err = proc.stderr.read()
    assert "fake server log kept in" in err
    os.unlink(err.split("log kept in ")[1].split(";")[0])


def test_launched_server_that_dies_at_start_names_its_log(tmp_path, capsys):
    cmd = [sys.executable, "-c", "import sys; print('bad flag --nope'); sys.exit(2)"]
    with pytest.raises(RuntimeError, match="exited with 2 before /health"):
        LaunchedServer(cmd, {}, f"http://127.0.0.1:{free_port()}", name="broken").__enter__()
    err = capsys.readouterr().err
    assert "broken server log kept in" in err and "bad flag --nope" in err
    os.unlink(err.split("log kept in ")[1].split(";")[0])


def test_compare_run_with_the_jaxpaged_backend(tiny_llama, tmp_path, capsys):
    """End to end on a tiny model: launched, warmed up, two rates, one table, server stopped (port free)."""
    from jaxpaged.bench.__main__ import main
    from jaxpaged.bench.serve_launch import _healthy

    url = f"http://127.0.0.1:{free_port()}"
    out = tmp_path / "rows.jsonl"
    main(["serve", "--backend", "jaxpaged", "--model", tiny_llama, "--base-url", url,
                    "--num-prompts", "3", "--input-len-range", "4:8", "--output-len-range", "3:4", "--ignore-eos",
                    "--request-rates", "4,inf", "--max-model-len", "64", "--max-num-seqs", "4",
                    "--kv-cache-space", "0.01", "--warmup-requests", "1", "--server-args=--enforce-eager",
                    "--output-json", str(out)])
    text = capsys.readouterr().out
    assert "| 4 | jaxpaged | 3/0 |" in text and "| inf | jaxpaged | 3/0 |" in text
    rows = [__import__("json").loads(line) for line in out.read_text().splitlines()]
    assert [r["backend"] for r in rows] == ["jaxpaged", "jaxpaged"] and all(r["failed"] == 0 for r in rows)
    assert not _healthy(url)


def test_compare_plot_from_json_lines(tmp_path):
    """`python -m jaxpaged.bench.plot rows.jsonl out.png` on --backend rows draws them side by side."""
    pytest.importorskip("matplotlib")
    import json
    import subprocess

    from tests.server_utils import REPO_ROOT
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps(dict(r, e2e_ms=r["ttft_ms"], backend=name)) + "\n"
                            for name, rs in RESULTS.items() for r in rs))
    out = tmp_path / "cmp.png"
    subprocess.run([sys.executable, "-m", "jaxpaged.bench.plot", str(rows), str(out)], check=True, cwd=REPO_ROOT)
    assert out.read_bytes()[:4] == b"\x89PNG"
