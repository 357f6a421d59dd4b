"""Ray, end to end, on a tiny random-weight Llama. One local Ray (127.0.0.1, no dashboard, 4 logical CPUs) for
the whole module, started here and stopped at the end; everything else joins it through RAY_ADDRESS:

- examples/ray_replicas.py's DistributedLLM: an LLM in each of two Ray actors; both give the same greedy tokens.
- `python -m jaxpaged.server --data-parallel-size 2 --data-parallel-backend ray`: 16 concurrent requests all
  answered, each equal to the single engine's output (the example's), both replicas took requests (per-replica
  metrics), the dashboard's metrics are all exported; then one replica's actor is killed mid-request: that
  request gets a 503 naming the replica, /health says so, and the other replica keeps serving.
- `--tensor-parallel-size 2 --distributed-executor-backend ray`: one engine over two jax.distributed processes.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
import threading

import httpx
import pytest

from tests.server_utils import ServerProcess, wait_for
from tests.test_data_parallel import dashboard_metric_names, exported_metric_names

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def ray_address():
    import ray

    from jaxpaged.server.ray_utils import local_ray_kwargs, start_local_env
    saved = os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    start_local_env()    # this process and every child: Ray on the loopback only
    ray.init(**local_ray_kwargs(num_cpus=4), log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        if saved is None:
            os.environ.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
        else:
            os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = saved


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    """Converted params and XLA's compilation cache, shared by the example's actors and the server's replicas."""
    return str(tmp_path_factory.mktemp("ray-cache"))


@pytest.fixture(scope="module")
def example_results(ray_address, tiny_llama, cache_dir):
    """examples/ray_replicas.py's actors, driven from this process (its main() does the same from the CLI)."""
    import importlib.util

    import ray
    from ray import cloudpickle

    from jaxpaged import SamplingParams
    spec = importlib.util.spec_from_file_location("ray_replicas", os.path.join(ROOT, "examples", "ray_replicas.py"))
    example = importlib.util.module_from_spec(spec)
    sys.modules["ray_replicas"] = example
    spec.loader.exec_module(example)
    cloudpickle.register_pickle_by_value(example)    # the workers cannot import it by name
    replicas = [example.DistributedLLM.options(num_cpus=1).remote(
        model=tiny_llama, max_model_len=1024, max_num_seqs=8, enforce_eager=True, download_dir=cache_dir)
        for _ in range(2)]
    try:
        params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
        return {"per_replica": ray.get([r.generate.remote(example.PROMPTS, params) for r in replicas]),
                "sharded": example.generate_sharded(replicas, example.PROMPTS, params)}
    finally:
        for r in replicas:
            ray.kill(r)
        cloudpickle.unregister_pickle_by_value(example)
        sys.modules.pop("ray_replicas", None)


@pytest.fixture(scope="module")
def dp_server(ray_address, tiny_llama, cache_dir, example_results):
    # after the example (which fills the compilation cache the replicas then reuse)
    server = ServerProcess(["--model", tiny_llama, "--served-model-name", "tiny", "--data-parallel-size", "2",
                            "--data-parallel-backend", "ray", "--enforce-eager", "--max-model-len", "1024",
                            "--max-num-seqs", "8", "--download-dir", cache_dir],
                           env={"RAY_ADDRESS": ray_address}, startup_timeout=600)
    try:
        yield server
    finally:
        assert server.stop() == 0, server.output()[-4000:]


def test_llm_in_two_ray_actors_gives_equal_outputs(example_results):
    first, second = example_results["per_replica"]
    assert [r["token_ids"] for r in first] == [r["token_ids"] for r in second]
    assert all(len(r["token_ids"]) == MAX_TOKENS for r in first)
    assert example_results["sharded"] == first          # prompts split over the actors: the same answers


def test_two_replicas_answer_16_concurrent_requests_like_one_engine(dp_server, example_results):
    reference = {r["prompt"]: r["text"] for r in example_results["per_replica"][0]}
    prompts = [p for p in reference for _ in range(4)]    # 16 requests, every other one streamed

    async def one(client, i, prompt):
        body = {"model": "tiny", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
        if i % 2 == 0:
            r = await client.post(dp_server.url + "/v1/completions", json=body)
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["text"]
        text = ""
        async with client.stream("POST", dp_server.url + "/v1/completions", json={**body, "stream": True}) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    text += json.loads(line[6:])["choices"][0]["text"]
        return text

    async def main():
        async with httpx.AsyncClient(timeout=300) as client:
            return await asyncio.gather(*(one(client, i, p) for i, p in enumerate(prompts)))

    before = dp_server.metrics()
    texts = asyncio.run(main())
    assert texts == [reference[p] for p in prompts]
    after = dp_server.metrics()
    done = [after.get(f'jaxpaged:request_success_total{{engine="{i}",finished_reason="length",model_name="tiny"}}',
                      0) - before.get(f'jaxpaged:request_success_total{{engine="{i}",finished_reason="length",'
                                      f'model_name="tiny"}}', 0) for i in range(2)]
    assert sum(done) == 16 and min(done) >= 1, done
    assert after["jaxpaged:generation_tokens_total"] - before.get("jaxpaged:generation_tokens_total", 0) == 16 * 8


def test_dashboard_metrics_are_exported_by_the_dp_server(dp_server):
    exported = exported_metric_names(httpx.get(dp_server.url + "/metrics", timeout=30).text)
    assert dashboard_metric_names() <= exported, sorted(dashboard_metric_names() - exported)


def test_client_disconnect_aborts_the_request_on_its_replica(dp_server):
    body = {"model": "tiny", "prompt": "The quick brown fox", "max_tokens": 900, "ignore_eos": True, "stream": True}
    before = dp_server.metrics()
    with httpx.Client(timeout=120) as client:
        with client.stream("POST", dp_server.url + "/v1/completions", json=body) as r:
            assert r.status_code == 200
            for i, _ in enumerate(r.iter_lines()):
                if i == 4:
                    break        # leaving mid-stream closes the connection
    # the replica that held it aborts it and frees its blocks (900 tokens would take far longer)
    wait_for(lambda: all(v == 0 for k, v in dp_server.metrics().items()
                         if k.startswith(("jaxpaged:num_requests_running{", "jaxpaged:kv_cache_usage_perc{"))),
             timeout=60, what="the replicas to be idle after the disconnect")
    after = dp_server.metrics()
    assert after["jaxpaged:generation_tokens_total"] - before["jaxpaged:generation_tokens_total"] < 900
    assert after["jaxpaged:e2e_request_latency_seconds_count"] == before["jaxpaged:e2e_request_latency_seconds_count"]


def test_killed_replica_fails_its_request_with_503_and_the_other_serves(dp_server):
    pids = {int(i): int(p) for i, p in re.findall(r"data-parallel replica (\d+) ready \(pid (\d+)",
                                                   dp_server.output())}
    assert sorted(pids) == [0, 1]
    result = {}

    def long_request():
        result["r"] = httpx.post(dp_server.url + "/v1/completions", timeout=300, json={
            "model": "tiny", "prompt": "The capital of France is", "max_tokens": 1000, "ignore_eos": True})

    thread = threading.Thread(target=long_request)
    thread.start()

    def running_replica():
        m = dp_server.metrics()
        busy = [i for i in range(2)
                if m.get(f'jaxpaged:num_requests_running{{engine="{i}",model_name="tiny"}}', 0) > 0]
        return busy[0] + 1 if busy else None    # +1: replica 0 is truthy too

    victim = wait_for(running_replica, timeout=120, what="the long request to run") - 1
    os.kill(pids[victim], signal.SIGKILL)
    thread.join(120)
    assert not thread.is_alive(), "the request on the killed replica hangs"
    r = result["r"]
    assert r.status_code == 503, r.text
    assert r.json()["error"]["type"] == "service_unavailable"
    assert f"replica {victim}" in r.json()["error"]["message"]
    health = httpx.get(dp_server.url + "/health", timeout=30)
    assert health.status_code == 503 and f"replica {victim} is dead" in health.json()["error"]["message"]
    for _ in range(2):
        r = httpx.post(dp_server.url + "/v1/completions", timeout=120, json={
            "model": "tiny", "prompt": "Hello", "max_tokens": 4})
        assert r.status_code == 200, r.text


def test_tensor_parallel_over_two_ray_processes_matches_one_engine(ray_address, tiny_llama, cache_dir,
                                                                   example_results):
    """--tensor-parallel-size 2 --distributed-executor-backend ray: two jax.distributed CPU processes (Ray
    actors, one device each) run one engine whose mesh spans them; greedy outputs equal the single engine's."""
    server = ServerProcess(["--model", tiny_llama, "--served-model-name", "tiny", "--tensor-parallel-size", "2",
                            "--distributed-executor-backend", "ray", "--enforce-eager", "--max-model-len", "1024",
                            "--max-num-seqs", "8", "--download-dir", cache_dir],
                           env={"RAY_ADDRESS": ray_address}, startup_timeout=600)
    try:
        assert "data-parallel replica 0 ready" in server.output() and "2 process(es)" in server.output()
        reference = {r["prompt"]: r["text"] for r in example_results["per_replica"][0]}

        async def one(client, prompt):
            r = await client.post(server.url + "/v1/completions", json={
                "model": "tiny", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True})
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["text"]

        async def main():
            async with httpx.AsyncClient(timeout=300) as client:
                return await asyncio.gather(*(one(client, p) for p in reference))

        assert asyncio.run(main()) == list(reference.values())
        m = server.metrics()
        assert m['jaxpaged:request_success_total{engine="0",finished_reason="length",model_name="tiny"}'] == 4
    finally:
        assert server.stop() == 0, server.output()[-4000:]
