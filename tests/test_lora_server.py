"""LoRA over HTTP (server/lora.py): adapters as models, routing by `model`, runtime load/unload, OpenAI errors."""
from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from jaxpaged.engine import LLMEngine
from jaxpaged.server.app import build_app
from jaxpaged.server.cli import parse_args
from jaxpaged.server.lora import LoRAModulePath, parse_lora_module
from tests.lora_utils import make_adapter, peft_greedy

PROMPT = [5, 6, 7, 8, 9]


@pytest.fixture(scope="module")
def setup(tiny_model_factory, tmp_path_factory):
    model = tiny_model_factory("llama")
    d = tmp_path_factory.mktemp("srv-loras")
    a = make_adapter(model, str(d / "a"), r=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"), seed=11)
    b = make_adapter(model, str(d / "b"), r=8, alpha=8, targets=("o_proj", "up_proj"), seed=12)
    engine = LLMEngine(model=model, enable_lora=True, max_loras=1, max_lora_rank=8, enforce_eager=True,
                       max_model_len=64, max_num_seqs=4, max_num_batched_tokens=32, download_dir=str(d / "cache"),
                       progress=False)
    app = build_app(engine, "base", lora_modules=[LoRAModulePath("ad-a", a)], allow_runtime_lora_updating=True)
    with TestClient(app) as client:
        yield model, a, b, client


def _complete(client, model: str):
    return client.post("/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": 5,
                                                "temperature": 0, "ignore_eos": True})


def test_adapters_are_models_and_route_requests(setup):
    model, a, b, client = setup
    cards = {c["id"]: c for c in client.get("/v1/models").json()["data"]}
    assert cards["ad-a"]["parent"] == "base" and cards["ad-a"]["root"] == a and cards["base"]["parent"] is None
    for name, path in (("ad-a", a), ("base", None)):
        resp = _complete(client, name)
        assert resp.status_code == 200, resp.text
        expected = peft_greedy(model, path, PROMPT, 5)
        assert resp.json()["usage"]["completion_tokens"] == 5
        # compare through the text: the tiny tokenizer round-trips its own output
        assert resp.json()["choices"][0]["text"] == client.post(
            "/detokenize", json={"tokens": expected}).json()["prompt"]
    metrics = client.get("/metrics").text
    assert 'jaxpaged:lora_requests_info{engine="0",max_lora="1",model_name="base",running_lora_adapters=""' in metrics
    chat = client.post("/v1/chat/completions", json={"model": "ad-a", "max_tokens": 3,
                                                      "messages": [{"role": "user", "content": "Hello"}]})
    assert chat.status_code == 200, chat.text


def test_unknown_adapter_is_openai_404(setup):
    client = setup[3]
    resp = _complete(client, "no-such-adapter")
    assert resp.status_code == 404
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == "model_not_found"


def test_runtime_load_and_unload(setup):
    model, a, b, client = setup
    resp = client.post("/v1/load_lora_adapter", json={"lora_name": "ad-b", "lora_path": b})
    assert resp.status_code == 200 and "ad-b" in resp.text
    assert "ad-b" in {c["id"] for c in client.get("/v1/models").json()["data"]}
    resp = _complete(client, "ad-b")         # max_loras=1: ad-a's slot is reused
    assert resp.json()["choices"][0]["text"] == client.post(
        "/detokenize", json={"tokens": peft_greedy(model, b, PROMPT, 5)}).json()["prompt"]
    dup = client.post("/v1/load_lora_adapter", json={"lora_name": "ad-b", "lora_path": b})
    assert dup.status_code == 400 and dup.json()["error"]["param"] == "lora_name"
    bad = client.post("/v1/load_lora_adapter", json={"lora_name": "ad-c", "lora_path": "/nonexistent"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "lora_path"
    missing = client.post("/v1/load_lora_adapter", json={"lora_name": "ad-c"})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "lora_path"
    extra = client.post("/v1/load_lora_adapter", json={"lora_name": "ad-c", "lora_path": b, "bogus": 1})
    assert extra.status_code == 400 and extra.json()["error"]["param"] == "bogus"
    paths = client.get("/openapi.json").json()["paths"]
    assert "lora_path" in json.dumps(paths["/v1/load_lora_adapter"]) or "LoadLoRAAdapterRequest" in json.dumps(paths)
    assert client.post("/v1/unload_lora_adapter", json={"lora_name": "ad-b"}).status_code == 200
    assert _complete(client, "ad-b").status_code == 404
    gone = client.post("/v1/unload_lora_adapter", json={"lora_name": "ad-b"})
    assert gone.status_code == 404 and set(gone.json()["error"]) == {"message", "type", "param", "code"}


def test_runtime_routes_need_the_flag(tiny_model_factory, monkeypatch):
    from tests.fake_engine import FakeEngine
    monkeypatch.delenv("JAXPAGED_ALLOW_RUNTIME_LORA_UPDATING", raising=False)
    with TestClient(build_app(FakeEngine(max_model_len=64), "m")) as client:
        resp = client.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/x"})
        assert resp.status_code == 404 and "error" in resp.json()
    with pytest.raises(ValueError, match="needs --enable-lora"):
        build_app(FakeEngine(max_model_len=64), "m", lora_modules=[LoRAModulePath("x", "/x")])


def test_cli_lora_flags():
    args, config = parse_args(["--enable-lora", "--max-loras", "4", "--max-lora-rank", "64", "--lora-modules",
                               "a=/p/a", '{"name": "b", "path": "/p/b", "base_model_name": "m"}',
                               "--allow-runtime-lora-updating", "--max-cpu-loras", "8", "--lora-dtype", "auto"])
    assert (config.enable_lora, config.max_loras, config.max_lora_rank) == (True, 4, 64)
    assert args.lora_modules == [LoRAModulePath("a", "/p/a"), LoRAModulePath("b", "/p/b", "m")]
    assert args.allow_runtime_lora_updating
    with pytest.raises(Exception, match="name=path"):
        parse_lora_module("no-equals-sign")


def test_lora_requests_info_metric_keeps_one_series():
    from jaxpaged.server.metrics import ServerMetrics
    m = ServerMetrics("base")
    m.update_from_stats({"max_lora": 2, "running_lora_adapters": "a,b", "waiting_lora_adapters": "c"})
    m.update_from_stats({"max_lora": 2, "running_lora_adapters": "c", "waiting_lora_adapters": ""})
    lines = [x for x in m.render().decode().splitlines() if x.startswith("jaxpaged:lora_requests_info{")]
    assert len(lines) == 1 and 'running_lora_adapters="c"' in lines[0] and 'max_lora="2"' in lines[0]
