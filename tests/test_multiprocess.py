"""Multi-process JAX: two local CPU processes (jax.distributed over 127.0.0.1, Gloo collectives) run one engine.

Each process has 2 CPU devices; the "tp" mesh spans all 4, so every layer's all-reduce crosses the process
boundary. Both processes run the same deterministic scheduler and feed the same host inputs to the SPMD step
(multi-controller JAX); the sampled tokens come back replicated, so both see them. Greedy tokens must equal
Hugging Face transformers' on the same tiny model.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

from tests.hf_reference import hf_greedy, hf_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = [[5, 6, 7], list(range(3, 40)), [100] * 20]
MAX_TOKENS = 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_one_engine_tp4(tmp_path, tiny_llama):
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    procs, outs = [], []
    for pid in range(2):
        spec = dict(devices=2, model=tiny_llama, tps=[4], prompts=PROMPTS, max_tokens=MAX_TOKENS, attention_backend="jnp",
                    download_dir=str(tmp_path / f"cache{pid}"), params=["layers/q_proj/kernel"],
                    distributed=dict(port=port, num_processes=2, process_id=pid))
        spec_path, out_path = tmp_path / f"spec{pid}.json", tmp_path / f"out{pid}.json"
        spec_path.write_text(json.dumps(spec))
        log = open(tmp_path / f"log{pid}.txt", "w")
        procs.append(subprocess.Popen([sys.executable, "-m", "tests.tp_worker", str(spec_path), str(out_path)],
                                      cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
        outs.append(out_path)
    try:
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    logs = [(tmp_path / f"log{pid}.txt").read_text()[-3000:] for pid in range(2)]
    assert codes == [0, 0], logs
    results = [json.loads(o.read_text()) for o in outs]

    model = hf_model("llama")
    expected = [hf_greedy(model, p, MAX_TOKENS) for p in PROMPTS]
    for r in results:
        assert r["global_devices"] == 4
        assert r["tokens"]["4"] == expected
        assert r["num_kv_heads"]["4"] == 4                                   # 2 KV heads replicated x2
        assert r["shards"]["4"]["layers/q_proj/kernel"] == [[2, 64, 16]] * 2   # this process's 2 devices
        assert [k[1] for k in r["kv_shards"]["4"]] == [1, 1]
