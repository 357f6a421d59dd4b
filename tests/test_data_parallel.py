"""Data-parallel serving without Ray: the router; DataParallelEngine over in-process FakeEngine replicas behind
the real app (routing, per-replica metrics, aborts reaching the owning replica, a dead replica's requests
failing with 503 and /health naming it); the RemoteEngine protocol and the mp transport; the mp backend end to
end (a server process with two child-process FakeEngine replicas); the Grafana dashboard's queries against the
exported metrics; the distributed flags' errors (Ray missing, bad combinations).
The same paths on Ray actors with a real model: tests/test_ray_serving.py.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import sys

import pytest
from fastapi.testclient import TestClient

from jaxpaged.sampling_params import SamplingParams
from jaxpaged.server.app import build_app
from jaxpaged.server.async_engine import AsyncLLMEngine, EngineDeadError
from jaxpaged.server.data_parallel import DataParallelEngine
from jaxpaged.server.metrics import ServerMetrics
from jaxpaged.server.router import Router, prefix_block_hashes, request_cost
from tests.fake_engine import FakeEngine, expected_tokens
from tests.server_utils import parse_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DASHBOARD = os.path.join(ROOT, "examples", "monitoring", "grafana_dashboard.json")

# ============================================================== router


def test_router_least_work_then_round_robin():
    router = Router(3, block_size=4)
    alive = [True, True, True]
    # idle: ties go round-robin
    picks = []
    for _ in range(3):
        r = router.choose([1, 2, 3], 10, alive)
        router.assign(r, [1, 2, 3], 10)
        picks.append(r)
    assert picks == [0, 1, 2]
    router.release(1, 10)
    assert router.choose([9], 10, alive) == 1            # the least outstanding work
    assert router.choose([9], 10, [True, False, True]) in (0, 2)
    with pytest.raises(LookupError):
        router.choose([9], 10, [False, False, False])


def test_router_prefix_affinity_counts_cached_tokens_as_saved_work():
    router = Router(2, block_size=4)
    alive = [True, True]
    shared = list(range(100, 112))                          # 3 full blocks
    router.assign(1, shared + [7], 20)
    router.assign(0, [50, 51], 5)
    # replica 1 holds 12 prompt tokens of this request: 20 + 20 - 12 = 28 beats 5 + 20 = 25? no: 25 < 28
    assert router.choose(shared + [8], 20, alive) == 0
    router.assign(0, [60, 61], 10)                          # replica 0 now at 15: 35 > 28
    assert router.choose(shared + [8], 20, alive) == 1
    # only leading blocks count: a different first block shares nothing
    assert router.choose([0, 0, 0, 0] + shared, 20, alive) == 0
    assert prefix_block_hashes(shared, 4) == prefix_block_hashes(shared + [1, 2], 4)
    assert request_cost(10, SamplingParams(max_tokens=5, n=3)) == 25


# ============================================================== DataParallelEngine over FakeEngines


class DyingEngine(FakeEngine):
    """A FakeEngine whose process 'dies' at its next step once `die` is set (what RemoteEngine raises)."""

    die = False

    def step(self):
        if self.die:
            raise EngineDeadError("data-parallel replica 0 died: test kill")
        return super().step()


def make_dp(n: int = 2, step_delay: float = 0.0):
    from tests.tiny_models import make_tokenizer
    tok = make_tokenizer(320)
    engines = [DyingEngine(tok, max_model_len=64, step_delay=step_delay) for _ in range(n)]
    metrics = ServerMetrics("fake-model", n)
    dp = DataParallelEngine([AsyncLLMEngine(e, metrics=metrics.engine(i)) for i, e in enumerate(engines)],
                            block_size=16)
    dp.metrics = metrics
    return dp, engines


def test_fake_replicas_answer_and_every_series_names_its_replica():
    dp, engines = make_dp()
    with TestClient(build_app(dp, "fake-model")) as client:
        for i in range(8):
            r = client.post("/v1/completions", json={"prompt": f"Hello world {i}", "max_tokens": 3})
            assert r.status_code == 200, r.text
            ids = engines[0].tokenizer.encode(f"Hello world {i}")
            assert r.json()["choices"][0]["text"] == engines[0].tokenizer.decode(expected_tokens(ids, 3))
        assert client.get("/health").status_code == 200
        text = client.get("/metrics").text
    m = parse_metrics(text)
    per_engine = [m[f'jaxpaged:request_success_total{{engine="{i}",finished_reason="length",'
                    f'model_name="fake-model"}}'] for i in range(2)]
    assert per_engine == [4.0, 4.0]                          # idle server: round-robin
    assert m["jaxpaged:generation_tokens_total"] == 24
    for line in text.splitlines():
        if line.startswith("jaxpaged:") and "_created" not in line:
            assert 'engine="' in line and 'model_name="fake-model"' in line, line
    assert all(len(e._thread_ids) == 1 for e in engines)


def test_abort_reaches_the_replica_that_holds_the_request():
    dp, engines = make_dp(step_delay=0.01)

    async def main():
        dp.start()
        try:
            params = SamplingParams(max_tokens=50, ignore_eos=True)
            a = await dp.add_request("a", [5, 6, 7], params)
            b = await dp.add_request("b", [5, 6, 8], params)
            owner_a, owner_b = dp.replica_of("a"), dp.replica_of("b")
            assert {owner_a, owner_b} == {0, 1}
            await a.get()
            dp.abort("a")
            for _ in range(500):
                if "a" not in engines[owner_a].requests:
                    break
                await asyncio.sleep(0.01)
            assert "a" not in engines[owner_a].requests and "b" in engines[owner_b].requests
            assert dp.replica_of("a") is None and dp.router.num_requests == [0 if i == owner_a else 1
                                                                                for i in range(2)]
            last = None
            async for last in b:
                pass
            assert last.finished and len(last.outputs[0].token_ids) == 50
            assert dp.router.work == [0, 0] and dp.router.num_requests == [0, 0]
        finally:
            await asyncio.to_thread(dp.stop)

    asyncio.run(main())


def test_dead_replica_fails_its_requests_with_503_and_health_names_it():
    dp, engines = make_dp()
    engines[0].die = True
    with TestClient(build_app(dp, "fake-model")) as client:
        # an idle server routes the first request to replica 0, which dies in its step
        r = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 3})
        assert r.status_code == 503, r.text
        assert r.json()["error"]["type"] == "service_unavailable"
        assert "replica 0 died" in r.json()["error"]["message"]
        h = client.get("/health")
        assert h.status_code == 503 and "replica 0" in h.json()["error"]["message"]
        # the live replica keeps serving, streams too
        for _ in range(3):
            r = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 3})
            assert r.status_code == 200, r.text
        with client.stream("POST", "/v1/completions",
                           json={"prompt": "Hi", "max_tokens": 2, "stream": True}) as s:
            assert s.status_code == 200 and "[DONE]" in "".join(s.iter_text())
        m = parse_metrics(client.get("/metrics").text)
    assert m['jaxpaged:request_success_total{engine="1",finished_reason="length",model_name="fake-model"}'] == 4


class InlineWorker:
    """A WorkerHandle that runs its EngineWorker (over a FakeEngine) in this process: the protocol without a transport."""

    name = "inline"

    def __init__(self, engine):
        from jaxpaged.server.remote_engine import EngineWorker
        self.worker = EngineWorker()
        self.worker.engine = engine

    def submit(self, method, args):
        return self.worker.call(method, args)

    def wait(self, reply):
        return reply

    def is_alive(self) -> bool:
        return True

    def kill(self) -> None:
        pass


def test_remote_engine_protocol_keeps_stats_current_and_passes_value_errors():
    from jaxpaged.server.remote_engine import RemoteEngine
    fake = FakeEngine(max_model_len=64)
    remote = RemoteEngine([InlineWorker(fake)], config=fake.config)
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    remote.add_request("a", [5, 6, 7], params)
    assert remote.has_unfinished_requests() and remote.get_stats().num_waiting == 1
    with pytest.raises(ValueError, match="already in use"):      # the engine's own ValueError, not a wrapper
        remote.add_request("a", [5, 6, 7], params)
    outs = remote.step()
    assert [o.outputs[0].token_ids for o in outs] == [expected_tokens([5, 6, 7], 1)]
    assert remote.get_stats().num_running == 1 and remote.get_stats().kv_cache_usage > 0
    remote.abort_request(["a"])
    # the abort's reply carries the stats: freed blocks show although no step follows
    assert not remote.has_unfinished_requests()
    assert remote.get_stats().kv_cache_usage == 0 and remote.get_stats().num_running == 0
    assert remote.step() == []


def test_mp_worker_process_answers_and_its_death_is_an_engine_dead_error():
    """The `mp` transport: a spawned EngineWorker process answers calls; once it is killed, every call and
    the health ping raise EngineDeadError naming the replica (what ends its engine thread)."""
    from jaxpaged.server.remote_engine import ProcessWorker, RemoteEngine
    worker = ProcessWorker("replica 3", env={"JAX_PLATFORMS": "cpu"})
    engine = RemoteEngine([worker], config=None, name="data-parallel replica 3")
    try:
        assert engine._call_one(0, "ping") == worker._proc.pid
        engine.ping_workers()
        with pytest.raises(ValueError, match="unknown method"):
            engine._call_one(0, "no_such_method")
        worker._proc.kill()
        worker._proc.join(30)
        with pytest.raises(EngineDeadError, match="data-parallel replica 3 died"):
            engine.ping_workers()
        with pytest.raises(EngineDeadError, match="data-parallel replica 3 died"):
            engine.step()
    finally:
        worker.kill()


def test_replica_cpu_shares_and_gpu_groups(monkeypatch):
    from jaxpaged.server import replicas
    monkeypatch.setattr(replicas.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4})
    assert replicas.cpu_shares(2) == [[0, 1], [2, 3]]       # disjoint, equal; the odd core is left over
    assert replicas.cpu_shares(1) == [None]                 # one replica: every core
    assert replicas.cpu_shares(6) == [None] * 6             # fewer cores than processes: not pinned
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    env = replicas._worker_env(cpu=False, devices=2, replica=1, use_ray=False)
    assert env["CUDA_VISIBLE_DEVICES"] == "6,7"             # mp replica i: the i-th group of TP devices
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    env = replicas._worker_env(cpu=True, devices=2, replica=0, use_ray=True)
    assert "--xla_force_host_platform_device_count=2" in env["XLA_FLAGS"] and env["JAX_PLATFORMS"] == "cpu"


# ============================================================== the mp backend, end to end (FakeEngine replicas)


def test_mp_server_two_replicas_end_to_end():
    """`python -m jaxpaged.server --data-parallel-size 2` (local child processes) with FakeEngines inside
    (--engine-factory reaches the replica processes): 16 concurrent requests, half streamed, all exact and
    spread over both replicas; a replica killed mid-request fails that request with 503 and /health names it;
    the other keeps serving; SIGTERM still exits 0."""
    import threading

    import httpx

    from tests.server_utils import ServerProcess, wait_for
    from tests.tiny_models import make_tokenizer
    tok = make_tokenizer(320)
    server = ServerProcess(["--model", "fake-model", "--engine-factory", "tests.server_utils:make_fake_engine",
                            "--data-parallel-size", "2", "--max-model-len", "2048", "--num-kv-blocks", "257"],
                           env={"FAKE_ENGINE_STEP_DELAY": "0.005"}, startup_timeout=120)
    try:
        prompts = [f"Hello world {i}" for i in range(16)]

        async def one(client, i, prompt):
            body = {"prompt": prompt, "max_tokens": 6, "stream": i % 2 == 1}
            if not body["stream"]:
                r = await client.post(server.url + "/v1/completions", json=body)
                assert r.status_code == 200, r.text
                return r.json()["choices"][0]["text"]
            text = ""
            async with client.stream("POST", server.url + "/v1/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        text += json.loads(line[6:])["choices"][0]["text"]
            return text

        async def main():
            async with httpx.AsyncClient(timeout=60) as client:
                return await asyncio.gather(*(one(client, i, p) for i, p in enumerate(prompts)))

        texts = asyncio.run(main())
        assert texts == [tok.decode(expected_tokens(tok.encode(p), 6)) for p in prompts]
        m = server.metrics()
        done = [m.get(f'jaxpaged:request_success_total{{engine="{i}",finished_reason="length",'
                      f'model_name="fake-model"}}', 0) for i in range(2)]
        assert sum(done) == 16 and min(done) >= 1, done

        pids = {int(i): int(p) for i, p in re.findall(r"data-parallel replica (\d+) ready \(pid (\d+)",
                                                       server.output())}
        result = {}
        thread = threading.Thread(target=lambda: result.update(r=httpx.post(
            server.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 1500, "ignore_eos": True},
            timeout=120)))
        thread.start()

        def busy():
            m = server.metrics()
            return [i for i in range(2)
                    if m.get(f'jaxpaged:num_requests_running{{engine="{i}",model_name="fake-model"}}', 0)]

        victim = wait_for(busy, timeout=60, what="the long request to run")[0]
        os.kill(pids[victim], 9)
        thread.join(60)
        assert not thread.is_alive(), "the request on the killed replica hangs"
        assert result["r"].status_code == 503 and f"replica {victim}" in result["r"].json()["error"]["message"]
        health = httpx.get(server.url + "/health", timeout=30)
        assert health.status_code == 503 and f"replica {victim} is dead" in health.json()["error"]["message"]
        assert httpx.post(server.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2},
                          timeout=60).status_code == 200
    finally:
        assert server.stop() == 0, server.output()[-3000:]


# ============================================================== Grafana dashboard


def dashboard_metric_names() -> set[str]:
    with open(DASHBOARD) as f:
        dash = json.load(f)
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    exprs += [v["definition"] for v in dash["templating"]["list"] if "definition" in v]
    return {name for e in exprs for name in re.findall(r"jaxpaged:[A-Za-z0-9_:]+", e)}


def exported_metric_names(text: str) -> set[str]:
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}


def test_dashboard_queries_only_exported_metrics():
    names = dashboard_metric_names()
    # the list: requests by finish reason, running/waiting, KV cache, prefix hits, TTFT, ITL, E2E,
    # token throughput, preemptions
    for needed in ("request_success_total", "num_requests_running", "num_requests_waiting", "kv_cache_usage_perc",
                   "prefix_cache_hits_total", "time_to_first_token_seconds_bucket",
                   "time_per_output_token_seconds_bucket", "e2e_request_latency_seconds_bucket",
                   "prompt_tokens_total", "generation_tokens_total", "num_preemptions_total"):
        assert "jaxpaged:" + needed in names, needed
    dp, _ = make_dp()
    with TestClient(build_app(dp, "fake-model")) as client:
        for i in range(2):
            assert client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 3}).status_code == 200
        exported = exported_metric_names(client.get("/metrics").text)
    assert names <= exported, sorted(names - exported)
    with open(os.path.join(ROOT, "examples", "monitoring", "prometheus.yml")) as f:
        scrape = f.read()
    assert "metrics_path: /metrics" in scrape and "127.0.0.1:8000" in scrape


# ============================================================== flags


def test_ray_flags_without_ray_say_how_to_install(monkeypatch, caplog):
    from jaxpaged.server import __main__ as server_main
    from jaxpaged.server.ray_utils import require_ray
    monkeypatch.setitem(sys.modules, "ray", None)    # import ray -> ImportError
    with pytest.raises(RuntimeError, match=r'pip install "jaxpaged\[ray\]"'):
        require_ray()
    code = server_main.main(["--data-parallel-size", "2", "--data-parallel-backend", "ray"])
    assert code == 2
    assert 'pip install "jaxpaged[ray]"' in caplog.text


@pytest.mark.parametrize("argv, message", [
    (["--data-parallel-size", "0"], "--data-parallel-size must be >= 1"),
    (["--data-parallel-size", "2", "--data-parallel-size-local", "3"], "--data-parallel-size-local must be in"),
    (["--data-parallel-size", "2", "--data-parallel-size-local", "1"], "needs --data-parallel-backend ray"),
    (["--data-parallel-backend", "spark"], "invalid choice"),
])
def test_distributed_flag_errors(argv, message, capsys):
    from jaxpaged.server.cli import parse_args
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
