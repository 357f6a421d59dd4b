"""Server tests.

Part 1 runs the app in-process on FakeEngine (tests/fake_engine.py), whose tokens are known by hand:
exact JSON shapes, logprobs, stop, n, echo, errors, auth, metrics.

Part 2 starts ONE real `python -m jaxpaged.server` process on a tiny random-weight Llama and talks
to it with the official `openai` client (sync and async, streaming and not) and httpx: greedy
completions and chat equal `LLM.generate`, n=2, logprobs, stop, include_usage, /metrics, a client
disconnect frees its KV blocks, 64 concurrent streams leak nothing, errors leave it serving, and
SIGTERM shuts it down cleanly. Without a working engine, Part 2 runs on FakeEngine in the process
(via the hidden --engine-factory flag) and skips the comparisons with LLM.generate.
"""
from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from jaxpaged.server.app import build_app
from jaxpaged.server.cli import parse_args
from tests.fake_engine import FakeEngine, expected_tokens
from tests.server_utils import ServerProcess, StepGate, parse_metrics, wait_for

# ============================================================== part 1: in-process, FakeEngine


@pytest.fixture(scope="module")
def fake():
    engine = FakeEngine(max_model_len=64)
    with TestClient(build_app(engine, "fake-model")) as client:
        yield client, engine


def _ids(engine, text):
    return engine.tokenizer.encode(text)


def test_fake_completion_exact(fake):
    client, engine = fake
    r = client.post("/v1/completions", json={"model": "fake-model", "prompt": "Hello world", "max_tokens": 5,
                                             "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    ids = _ids(engine, "Hello world")
    toks = expected_tokens(ids, 5)
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["model"] == "fake-model" and isinstance(body["created"], int)
    assert body["choices"] == [{"index": 0, "text": engine.tokenizer.decode(toks), "logprobs": None,
                                "finish_reason": "length", "stop_reason": None}]
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 5, "total_tokens": len(ids) + 5}


def test_fake_prompt_forms_and_n(fake):
    client, engine = fake
    ids = _ids(engine, "The fox")
    for prompt in (ids, [ids, ids], ["The fox", "The fox"]):
        r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 3, "n": 2})
        assert r.status_code == 200, r.text
        choices = r.json()["choices"]
        n_prompts = 1 if isinstance(prompt[0], int) else 2
        assert [c["index"] for c in choices] == list(range(2 * n_prompts))
        for c in choices:
            assert c["text"] == engine.tokenizer.decode(expected_tokens(ids, 3, index=c["index"] % 2))
        assert r.json()["usage"]["completion_tokens"] == 3 * 2 * n_prompts


def test_fake_logprobs_and_echo(fake):
    client, engine = fake
    ids = _ids(engine, "Hello")
    r = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 3, "logprobs": 2, "echo": True})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    gen = expected_tokens(ids, 3)
    lp = choice["logprobs"]
    all_ids = ids + gen
    assert choice["text"] == "Hello" + engine.tokenizer.decode(gen)
    assert lp["tokens"] == [engine.tokenizer.decode([t]) for t in all_ids]
    assert lp["token_logprobs"] == [None] + [-1.0] * (len(ids) - 1) + [-0.5] * 3
    offsets = [0]
    for tok in lp["tokens"][:-1]:
        offsets.append(offsets[-1] + len(tok))
    assert lp["text_offset"] == offsets
    assert lp["top_logprobs"][0] is None
    last = lp["top_logprobs"][-1]
    assert last == {engine.tokenizer.decode([gen[-1]]): -0.5, engine.tokenizer.decode([gen[-1] + 1]): -1.0}


def test_fake_chat_logprobs_and_usage(fake):
    client, engine = fake
    r = client.post("/v1/chat/completions", json={
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        "max_completion_tokens": 4, "logprobs": True, "top_logprobs": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    prompt = engine.tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        tokenize=False, add_generation_prompt=True)
    ids = engine.tokenizer.encode(prompt, add_special_tokens=False)
    gen = expected_tokens(ids, 4)
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == engine.tokenizer.decode(gen)
    content = choice["logprobs"]["content"]
    assert [c["token"] for c in content] == [engine.tokenizer.decode([t]) for t in gen]
    assert all(c["logprob"] == -0.5 and len(c["top_logprobs"]) == 3 for c in content)
    assert content[0]["bytes"] == list(content[0]["token"].encode())
    assert [t["logprob"] for t in content[0]["top_logprobs"]] == [-0.5, -1.0, -1.5]
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 4, "total_tokens": len(ids) + 4}


def test_fake_stop_string_and_token(fake):
    client, engine = fake
    ids = _ids(engine, "Hello world")
    full = engine.tokenizer.decode(expected_tokens(ids, 8))
    stop = full[3:5]
    r = client.post("/v1/completions", json={"prompt": "Hello world", "max_tokens": 8, "stop": [stop]})
    c = r.json()["choices"][0]
    assert c["text"] == full[:full.find(stop)] and c["finish_reason"] == "stop" and c["stop_reason"] == stop
    stop_id = expected_tokens(ids, 8)[2]
    r = client.post("/v1/completions", json={"prompt": "Hello world", "max_tokens": 8, "stop_token_ids": [stop_id]})
    c = r.json()["choices"][0]
    assert c["finish_reason"] == "stop" and c["stop_reason"] == stop_id


def _sse(lines):
    events = [line[len("data: "):] for line in lines if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_fake_streaming_completion_usage(fake):
    client, engine = fake
    with client.stream("POST", "/v1/completions", json={
            "prompt": "Hello", "max_tokens": 6, "n": 2, "stream": True, "stream_options": {"include_usage": True}}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        chunks = _sse(list(r.iter_lines()))
    *body, last = chunks
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 12
    assert all(c["usage"] is None for c in body)
    ids = _ids(engine, "Hello")
    for i in range(2):
        text = "".join(ch["text"] for c in body for ch in c["choices"] if ch["index"] == i)
        assert text == engine.tokenizer.decode(expected_tokens(ids, 6, index=i))
        finals = [ch for c in body for ch in c["choices"] if ch["index"] == i and ch["finish_reason"]]
        assert len(finals) == 1 and finals[0]["finish_reason"] == "length"
    with client.stream("POST", "/v1/completions", json={"prompt": "Hello", "max_tokens": 2, "stream": True}) as r:
        chunks = _sse(list(r.iter_lines()))
    assert all("usage" not in c for c in chunks)


def test_fake_streaming_chat(fake):
    client, engine = fake
    with client.stream("POST", "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "stream": True}) as r:
        chunks = _sse(list(r.iter_lines()))
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    ids = engine.tokenizer.encode(engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True), add_special_tokens=False)
    assert text == engine.tokenizer.decode(expected_tokens(ids, 3))


BAD_COMPLETIONS = [
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "top_p": 1.5}, "top_p"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "n": "2"}, "n"),
    ({"prompt": "x", "temperature": "hot"}, "temperature"),
    ({"prompt": "x", "logprobs": 99}, "logprobs"),
    ({"prompt": "x", "presence_penalty": 3}, "presence_penalty"),
    ({"prompt": "x", "stop": 5}, "stop"),
    ({"prompt": "x" * 300}, "prompt"),
    ({"prompt": "x", "max_tokens": 1000}, "max_tokens"),
    ({"prompt": [400]}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": None}, "prompt"),
    ({}, "prompt"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
]


@pytest.mark.parametrize("body,param", BAD_COMPLETIONS)
def test_fake_invalid_completion_params(fake, body, param):
    client, _ = fake
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["message"]
    assert set(err) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("body,param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"content": "no role"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0}, "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 50}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
    ({"messages": "hi"}, "messages"),
])
def test_fake_invalid_chat_params(fake, body, param):
    client, _ = fake
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_fake_errors_shape_and_still_serving(fake):
    client, _ = fake
    r = client.post("/v1/completions", json={"model": "nope", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = client.post("/v1/completions", json=[1, 2])
    assert r.status_code == 400
    assert client.get("/v1/nothing").status_code == 404
    assert client.post("/v1/completions", json={"prompt": "ok", "max_tokens": 1}).status_code == 200


def test_fake_models_health_version_tokenize(fake):
    client, engine = fake
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["fake-model"]
    assert models["data"][0]["max_model_len"] == 64
    assert client.get("/health").status_code == 200
    assert client.get("/version").json()["version"]
    r = client.post("/tokenize", json={"prompt": "Hello world"}).json()
    assert r["tokens"] == engine.tokenizer.encode("Hello world") and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == 64
    r = client.post("/tokenize", json={"messages": [{"role": "user", "content": "Hi"}],
                                       "return_token_strs": True}).json()
    assert r["token_strs"][0] == "<|im_start|>"
    r = client.post("/detokenize", json={"tokens": engine.tokenizer.encode("Hello world")}).json()
    assert r == {"prompt": "Hello world"}
    assert client.post("/detokenize", json={"tokens": [10 ** 6]}).status_code == 400
    assert client.post("/tokenize", json={"prompt": 3}).status_code == 400


def test_fake_metrics_move_and_engine_single_thread(fake):
    client, engine = fake
    before = parse_metrics(client.get("/metrics").text)
    client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 4})
    after = parse_metrics(client.get("/metrics").text)
    assert after["jaxpaged:generation_tokens_total"] - before.get("jaxpaged:generation_tokens_total", 0) == 4
    assert after["jaxpaged:prompt_tokens_total"] > before.get("jaxpaged:prompt_tokens_total", 0)
    assert after["jaxpaged:e2e_request_latency_seconds_count"] > before.get(
        "jaxpaged:e2e_request_latency_seconds_count", 0)
    assert after["jaxpaged:time_to_first_token_seconds_count"] >= 1
    assert after["jaxpaged:kv_cache_usage_perc"] == 0.0
    assert len(engine._thread_ids) == 1 and threading.get_ident() not in engine._thread_ids


class _FlakyEngine(FakeEngine):
    """Raises from step() while `fail` is set (as a broken kernel would)."""
    fail = False

    def step(self):
        if self.fail:
            self.fail = False
            raise RuntimeError("boom")
        return super().step()


def test_fake_step_failure_fails_requests_not_server():
    engine = _FlakyEngine(max_model_len=64)
    with TestClient(build_app(engine, "m")) as client:
        engine.fail = True
        r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 3})
        assert r.status_code == 500 and r.json()["error"]["type"] == "internal_server_error"
        engine.fail = True
        with client.stream("POST", "/v1/completions", json={"prompt": "x", "max_tokens": 3, "stream": True}) as r:
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and "error" in json.loads(events[-2])
        assert engine.get_stats().kv_cache_usage == 0.0          # the failed requests were aborted
        r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 3})
        assert r.status_code == 200 and client.get("/health").status_code == 200


def test_fake_api_key():
    with TestClient(build_app(FakeEngine(max_model_len=64), "m", api_key="sekrit")) as client:
        body = {"prompt": "x", "max_tokens": 1}
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = client.post("/v1/completions", json=body, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
        r = client.post("/v1/completions", json=body, headers={"Authorization": "Bearer sekrit"})
        assert r.status_code == 200
        assert client.get("/health").status_code == 200 and client.get("/metrics").status_code == 200


def test_async_engine_batches_aborts_and_reports_errors():
    from jaxpaged.sampling_params import SamplingParams
    from jaxpaged.server.async_engine import AsyncLLMEngine

    async def main():
        engine = FakeEngine(max_model_len=64, step_delay=0.001)
        aeng = AsyncLLMEngine(engine)
        aeng.start()
        try:
            async def run(i):
                outs = [o async for o in aeng.generate(f"r{i}", [10 + i], SamplingParams(max_tokens=5))]
                return outs[-1]

            finals = await asyncio.gather(*(run(i) for i in range(10)))
            assert [f.outputs[0].token_ids for f in finals] == [expected_tokens([10 + i], 5) for i in range(10)]
            assert engine.num_steps <= 8                     # 10 requests x 5 tokens ran together
            with pytest.raises(ValueError, match="max_tokens"):
                await aeng.add_request("bad", [1], SamplingParams(max_tokens=1000))
            # a consumer that stops early aborts its request and frees its blocks
            gen = aeng.generate("long", [5], SamplingParams(max_tokens=60, ignore_eos=True))
            await gen.__anext__()
            await gen.aclose()
            for _ in range(200):
                await asyncio.sleep(0.01)
                if not engine.requests and aeng.get_stats().kv_cache_usage == 0.0:
                    break
            assert not engine.requests and aeng.get_stats().kv_cache_usage == 0.0
        finally:
            await asyncio.to_thread(aeng.stop)
        assert not aeng.is_running and len(engine._thread_ids) == 1

    asyncio.run(main())


def test_cli_flags_from_engine_config():
    args, config = parse_args(["--model", "m", "--max-model-len", "128", "--block-size", "32", "--num-kv-blocks",
                               "10", "--no-enable-prefix-caching", "--served-model-name", "a", "b",
                               "--api-key", "k", "--port", "9", "--dtype", "bf16"])
    assert (config.model, config.max_model_len, config.block_size, config.num_kv_blocks) == ("m", 128, 32, 10)
    assert config.enable_prefix_caching is False and config.dtype == "bfloat16"
    assert args.served_model_name == ["a", "b"] and args.api_key == "k" and args.port == 9
    _, default = parse_args([])
    from jaxpaged.engine_config import EngineConfig
    assert default == EngineConfig()
    with pytest.raises(SystemExit):
        parse_args(["--block-size", "7"])
    with pytest.raises(SystemExit):
        parse_args(["--max-model-len", "abc"])


# ============================================================== part 2: a real server process

API_KEY = "test-key"
# Small buckets (T in {16, 32}, B = 4) keep compilation short on CPU; 64 concurrent requests then queue
# and run 4 at a time. Attention takes the default backend (native on CPU); the kernels have their own tests.
ENGINE_KW = dict(max_model_len=512, num_kv_blocks=72, block_size=16, max_num_seqs=4, max_num_batched_tokens=32)
SERVER_ARGS = ["--max-model-len", "512", "--num-kv-blocks", "72", "--block-size", "16", "--max-num-seqs", "4",
               "--max-num-batched-tokens", "32", "--attention-backend", "native", "--served-model-name", "tiny",
               "--api-key", API_KEY, "--swap-space", "4"]   # a vLLM flag: accepted, ignored


def _real_engine_available() -> bool:
    try:
        import jaxpaged.llm  # noqa: F401
        return True
    except Exception:  # noqa: BLE001 - engine not written yet / broken import
        return False


@pytest.fixture(scope="module")
def server(tiny_model_factory, tmp_path_factory):
    real = _real_engine_available()
    # the engine's steps can be rationed by a test (StepGate); without the gate file they run freely
    gate = StepGate(str(tmp_path_factory.mktemp("step-gate") / "steps"))
    if real:   # converted params and compiled executables go to the session's $JAXPAGED_CACHE (conftest)
        model = tiny_model_factory("llama")
        args = ["--model", model, "--engine-factory", "tests.server_utils:make_gated_engine", *SERVER_ARGS]
    else:
        model = "fake-model"
        args = ["--model", model, "--engine-factory", "tests.server_utils:make_fake_engine", *SERVER_ARGS]
    proc = ServerProcess(args, env={"FAKE_ENGINE_STEP_DELAY": "0.01", StepGate.ENV: gate.path})
    proc.real, proc.model_dir, proc.gate = real, model, gate
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def llm(server):
    if not server.real:
        pytest.skip("no real engine: comparisons with LLM.generate need jaxpaged.llm")
    from jaxpaged import LLM
    # the same engine config and cache as the server: its compiled executables are reused
    return LLM(model=server.model_dir, **ENGINE_KW)


def _client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def _aclient(server):
    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=300)


def _greedy(llm, prompt, max_tokens, **kw):
    from jaxpaged import SamplingParams
    return llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=max_tokens, **kw),
                        use_tqdm=False)[0]


PROMPT = "The capital of France is"


def test_completion_equals_llm_generate(server, llm):
    expected = _greedy(llm, PROMPT, 12).outputs[0]
    client = _client(server)
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0)
    assert r.choices[0].text == expected.text
    assert r.choices[0].finish_reason == expected.finish_reason
    assert r.usage.completion_tokens == len(expected.token_ids)
    ids = llm.get_tokenizer().encode(PROMPT)
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=12, temperature=0)
    assert r.choices[0].text == expected.text and r.usage.prompt_tokens == len(ids)
    stream = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == expected.text


def test_chat_equals_llm_generate(server, llm):
    messages = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Hello world!"}]
    expected = llm.chat(messages, _sp(max_tokens=10), use_tqdm=False)[0].outputs[0]
    client = _client(server)
    r = client.chat.completions.create(model="tiny", messages=messages, max_completion_tokens=10, temperature=0)
    assert r.choices[0].message.content == expected.text and r.choices[0].message.role == "assistant"
    assert r.usage.completion_tokens == len(expected.token_ids)

    async def streamed():
        async with _aclient(server) as aclient:
            stream = await aclient.chat.completions.create(model="tiny", messages=messages, max_tokens=10,
                                                           temperature=0, stream=True)
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    assert asyncio.run(streamed()) == expected.text


def _sp(**kw):
    from jaxpaged import SamplingParams
    return SamplingParams(temperature=0.0, **kw)


def test_n2_logprobs_stop(server):
    client = _client(server)
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, n=2, temperature=0, logprobs=3)
    assert [c.index for c in r.choices] == [0, 1]
    if server.real:
        assert r.choices[0].text == r.choices[1].text      # greedy: both samples agree
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens // 2
    assert all(v <= 0 for v in lp.token_logprobs)
    assert all(1 <= len(top) <= 4 for top in lp.top_logprobs)
    # greedy: the chosen token is the most likely one
    assert all(abs(max(top.values()) - v) < 1e-4 for top, v in zip(lp.top_logprobs, lp.token_logprobs))
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, n=2, temperature=1.0, seed=7)
    assert len(r.choices) == 2 and r.usage.completion_tokens <= 12
    full = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=16, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    # a stop string from the middle of the greedy text (random weights: any printable piece will do)
    at = next(i for i in range(len(full) // 2, len(full)) if full[i].isprintable() and full[i] != "\ufffd")
    stop = full[at]
    c = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop],
                                  extra_body={"ignore_eos": True}).choices[0]
    assert c.finish_reason == "stop" and c.stop_reason == stop and c.text == full[:full.find(stop)]
    # echo + logprobs: the prompt comes back first (with logprobs where the engine provides them)
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=3, temperature=0, logprobs=1, echo=True)
    lp, n_prompt = r.choices[0].logprobs, r.usage.prompt_tokens
    assert r.choices[0].text.startswith(PROMPT) and len(lp.tokens) == n_prompt + r.usage.completion_tokens
    assert lp.token_logprobs[0] is None and lp.text_offset[0] == 0
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                       temperature=0, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob
               for t in content)


def test_include_usage_stream(server):
    client = _client(server)
    chunks = list(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=5, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
    assert all(c.usage is None for c in chunks[:-1])
    chunks = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                                 max_tokens=5, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens > 0


def test_metrics_counters_move(server):
    before = server.metrics()
    _client(server).completions.create(model="tiny", prompt=PROMPT, max_tokens=3, temperature=0,
                                       extra_body={"ignore_eos": True})
    after = server.metrics()
    assert after["jaxpaged:generation_tokens_total"] - before["jaxpaged:generation_tokens_total"] >= 3
    assert after["jaxpaged:prompt_tokens_total"] > before["jaxpaged:prompt_tokens_total"]
    assert after["jaxpaged:e2e_request_latency_seconds_count"] == before[
        "jaxpaged:e2e_request_latency_seconds_count"] + 1
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "num_preemptions_total",
                 "prefix_cache_queries_total", "time_to_first_token_seconds_count",
                 "time_per_output_token_seconds_count"):
        assert f"jaxpaged:{name}" in after, name


def _idle(server):
    m = server.metrics()
    return (m["jaxpaged:kv_cache_usage_perc"] == 0.0 and m["jaxpaged:num_requests_running"] == 0
            and m["jaxpaged:num_requests_waiting"] == 0)


def _in_engine(server) -> float:
    m = server.metrics()
    return m["jaxpaged:num_requests_running"] + m["jaxpaged:num_requests_waiting"]


def test_disconnect_frees_blocks(server):
    """A client that leaves mid-request gets its request aborted and its KV blocks freed. The engine's
    steps are rationed (StepGate), so the request is provably unfinished when the client leaves: no race
    between the model and the client, whatever the machine's speed."""
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 400, "ignore_eos": True, "stream": True}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    before = server.metrics()
    server.gate.allow(0)
    try:
        with httpx.Client(timeout=60) as client:
            with client.stream("POST", server.url + "/v1/completions", json=body, headers=headers) as r:
                assert r.status_code == 200
                wait_for(lambda: _in_engine(server) == 1, timeout=60, what="the request to reach the engine")
                server.gate.allow(3)          # the prefill step (first token) and two decode steps, then stand still
                gen0 = before["jaxpaged:generation_tokens_total"]
                wait_for(lambda: server.metrics()["jaxpaged:generation_tokens_total"] - gen0 == 3, timeout=60,
                         what="3 tokens generated")
                assert server.metrics()["jaxpaged:kv_cache_usage_perc"] > 0
                assert _in_engine(server) == 1
            # leaving the `with` closes the connection, mid-stream (397 tokens to go)
        # the server notices, aborts the request and frees its blocks
        wait_for(lambda: _idle(server), timeout=60, what="KV blocks freed after disconnect")
        after = server.metrics()
        assert after["jaxpaged:generation_tokens_total"] - before["jaxpaged:generation_tokens_total"] <= 3
        assert (after["jaxpaged:e2e_request_latency_seconds_count"]
                == before["jaxpaged:e2e_request_latency_seconds_count"])
        # a non-streamed request whose client closes the connection is aborted too
        request = json.dumps({**body, "stream": False}).encode()
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Authorization: Bearer " + API_KEY.encode() + b"\r\n"
                         b"Content-Length: " + str(len(request)).encode() + b"\r\n\r\n" + request)
            wait_for(lambda: _in_engine(server) == 1, timeout=60, what="the non-streamed request in the engine")
        wait_for(lambda: _idle(server), timeout=60, what="the request aborted after its client left")
        final = server.metrics()
        assert final["jaxpaged:generation_tokens_total"] == after["jaxpaged:generation_tokens_total"]
        assert final["jaxpaged:e2e_request_latency_seconds_count"] == before["jaxpaged:e2e_request_latency_seconds_count"]
    finally:
        server.gate.open()
    # and the engine serves on
    r = httpx.post(server.url + "/v1/completions", json={**body, "stream": False, "max_tokens": 2}, headers=headers,
                   timeout=120)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def test_64_concurrent_streams(server):
    async def one(aclient, i):
        stream = await aclient.completions.create(model="tiny", prompt=f"{PROMPT} {i}", max_tokens=8,
                                                  temperature=0.8, seed=i, stream=True,
                                                  extra_body={"ignore_eos": True})
        finish, text = None, ""
        async for chunk in stream:
            for c in chunk.choices:
                text += c.text
                finish = c.finish_reason or finish
        return finish

    async def run():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=300,
                                      http_client=httpx.AsyncClient(limits=httpx.Limits(max_connections=100),
                                                                    timeout=300)) as aclient:
            return await asyncio.gather(*(one(aclient, i) for i in range(64)))

    finishes = asyncio.run(run())
    assert finishes == ["length"] * 64
    wait_for(lambda: _idle(server), timeout=30, what="no KV blocks in use after 64 streams")


def test_errors_keep_serving(server):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    url = server.url
    cases = [
        ({"model": "tiny", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
        ({"model": "tiny", "prompt": "x", "temperature": -0.5}, 400, "temperature"),
        ({"model": "tiny", "prompt": "x", "top_p": 0}, 400, "top_p"),
        ({"model": "tiny", "prompt": "x", "n": 0}, 400, "n"),
        ({"model": "tiny", "prompt": "hello " * 600}, 400, "prompt"),
        ({"model": "tiny", "prompt": {"a": 1}}, 400, "prompt"),
        ({"model": "gpt-4", "prompt": "x"}, 404, "model"),
    ]
    with httpx.Client(timeout=60) as client:
        for body, status, param in cases:
            r = client.post(url + "/v1/completions", json=body, headers=headers)
            assert r.status_code == status, (body, r.text)
            assert r.json()["error"]["param"] == param
        r = client.post(url + "/v1/completions", json=cases[0][0])
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = client.post(url + "/v1/completions", json=cases[0][0], headers={"Authorization": "Bearer nope"})
        assert r.status_code == 401
        assert client.get(url + "/v1/models").status_code == 401
        r = client.post(url + "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2},
                        headers=headers)
        assert r.status_code == 200
    with pytest.raises(openai.BadRequestError):
        _client(server).completions.create(model="tiny", prompt="x", max_tokens=-1)
    with pytest.raises(openai.NotFoundError):
        _client(server).completions.create(model="nope", prompt="x")
    assert [m.id for m in _client(server).models.list().data] == ["tiny"]


def test_cors_and_vllm_flags(server):
    r = httpx.options(server.url + "/v1/completions", headers={
        "Origin": "http://example.com", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] in ("*", "http://example.com")
    assert "--swap-space is accepted for vLLM compatibility and ignored" in server.output()


def test_zz_sigterm_graceful_shutdown(server):
    """Last in the module: SIGTERM with a stream in flight ends that stream at once (an error event,
    then [DONE]) and the process exits with status 0; the fixture's stop is then a no-op."""
    seen, first = [], threading.Event()

    def stream():
        body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 450, "ignore_eos": True, "stream": True}
        try:
            with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60,
                              headers={"Authorization": f"Bearer {API_KEY}"}) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        seen.append((time.monotonic(), line[6:]))
                        first.set()
        finally:
            first.set()

    reader = threading.Thread(target=stream)
    reader.start()
    assert first.wait(60)
    signalled = time.monotonic()
    rc = server.stop(timeout=60)
    reader.join(30)
    assert rc == 0, server.output()[-3000:]
    assert seen and seen[-1][1] == "[DONE]"
    # ended by the shutdown, well inside uvicorn's 5 s grace period (not waited for nor cut off)
    assert seen[-1][0] - signalled < 3.0, seen[-1][0] - signalled
    out = server.output()
    assert "Traceback" not in out, out[-3000:]
    assert "engine thread stopped" in out and "server stopped" in out, out[-3000:]
