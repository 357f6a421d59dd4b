"""What a new user meets first (issue 12): declared runtime dependencies, a missing runtime piece reported as the
server's fault, chat messages checked as OpenAI checks them (offline and in the server), a body sent with the wrong
content type, and the tests' own temporary cache."""
from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import sys
import tempfile
import tomllib

import pytest
from fastapi.testclient import TestClient

from jaxpaged.chat_messages import ChatMessageError, normalize_messages
from jaxpaged.server.app import build_app
from tests.fake_engine import FakeEngine

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNTIME_DIRS = ("jaxpaged", "convert", "server", "cpu_kernels", "pallas_kernels")
# imported only inside functions that say what to install when they are missing: pytorch_model.bin
# checkpoints and the bench's reference backends (besides the extras' packages: ray, matplotlib, ...)
OPTIONAL = {"torch": "pytorch_model.bin / bench hf", "vllm": "bench vllm"}


def _pyproject() -> dict:
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def _dist_name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _third_party_imports() -> set[str]:
    names = set()
    for top in RUNTIME_DIRS:
        for dirpath, _, files in os.walk(os.path.join(REPO, top)):
            for fn in files:
                if not fn.endswith(".py"):
                    continue
                tree = ast.parse(open(os.path.join(dirpath, fn)).read())
                for node in ast.walk(tree):
                    if isinstance(node, ast.Import):
                        names.update(a.name.split(".")[0] for a in node.names)
                    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                        names.add(node.module.split(".")[0])
    first_party = {"jaxpaged", "convert", "server", "cpu_kernels", "pallas_kernels"}
    return {n for n in names if n not in sys.stdlib_module_names and n not in first_party}


def test_every_runtime_import_is_a_declared_dependency():
    project = _pyproject()["project"]
    declared = {_dist_name(r) for r in project["dependencies"]}
    assert "jinja2" in declared, "transformers' apply_chat_template needs jinja2: chat requests fail without it"
    extras = {_dist_name(r) for name, reqs in project["optional-dependencies"].items() if name != "test"
              for r in reqs}
    dists = importlib.metadata.packages_distributions()
    # what a declared dependency requires itself is installed with it (fastapi -> starlette, jax -> jaxlib)
    provided = set(declared)
    for name in declared:
        for req in importlib.metadata.requires(name) or ():
            if "extra ==" not in req:
                provided.add(_dist_name(req))
    missing = {}
    for module in _third_party_imports() - set(OPTIONAL):
        owners = {d.lower().replace("_", "-") for d in dists.get(module, [module])}
        if not owners & (provided | extras):
            missing[module] = sorted(owners)
    assert not missing, f"imported at run time but not declared in pyproject.toml dependencies: {missing}"


def test_bench_plot_is_an_extra():
    assert "matplotlib" in {_dist_name(r) for r in _pyproject()["project"]["optional-dependencies"]["bench"]}


# ---------------------------------------------------------------- chat messages (LLM.chat and the server)

def test_messages_valid_forms():
    convo = normalize_messages([
        {"role": "developer", "content": "Be brief."},
        {"role": "system", "content": [{"type": "text", "text": "Answer "}, {"type": "text", "text": "in French."}]},
        {"role": "user", "content": "", "name": "ann"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function",
                                                               "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "42"},
        {"role": "assistant", "content": "The answer is 42."}])
    assert [m["role"] for m in convo] == ["developer", "system", "user", "assistant", "tool", "assistant"]
    assert convo[1]["content"] == "Answer in French." and convo[2]["name"] == "ann"
    assert convo[3]["content"] is None and convo[4]["tool_call_id"] == "c1"


@pytest.mark.parametrize("messages, param, words", [
    ([{"role": "wizard", "content": "hi"}], "messages[0].role", "'wizard' is not a valid role"),
    ([{"role": "", "content": "hi"}], "messages[0].role", "'' is not a valid role"),
    ([{"content": "hi"}], "messages[0].role", "missing is not a valid role"),
    ([{"role": "user"}], "messages[0].content", "required for role 'user'"),
    ([{"role": "system", "content": None}], "messages[0].content", "required for role 'system'"),
    ([{"role": "user", "content": "a"}, {"role": "assistant"}], "messages[1].content", "unless tool_calls"),
    ([{"role": "tool", "content": "42"}], "messages[0].tool_call_id", "tool message needs"),
    ([{"role": "user", "content": "a", "tool_calls": []}], "messages[0].tool_calls", "only assistant"),
    ([{"role": "user", "content": 7}], "messages[0].content", "expected a string or a list"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "messages[0].content[0]",
     "only text parts"),
    ([], "messages", "must not be empty"),
    (["hi"], "messages[0]", "expected an object"),
])
def test_messages_refused_like_openai(messages, param, words):
    with pytest.raises(ChatMessageError, match=re.escape(words)) as info:
        normalize_messages(messages)
    assert info.value.param == param and str(info.value).startswith(param + ":")
    assert isinstance(info.value, ValueError)      # LLM.chat raises it as is: a ValueError naming the field


@pytest.fixture(scope="module")
def client():
    with TestClient(build_app(FakeEngine(max_model_len=64), "fake-model")) as c:
        yield c


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/tokenize"])
@pytest.mark.parametrize("message, param", [
    ({"role": "wizard", "content": "hi"}, "messages[0].role"),
    ({"role": "", "content": "hi"}, "messages[0].role"),
    ({"role": "user"}, "messages[0].content"),
    ({"role": "tool", "content": "42"}, "messages[0].tool_call_id"),
])
def test_server_refuses_bad_messages(client, path, message, param):
    r = client.post(path, json={"messages": [message], "max_tokens": 2})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"].startswith(param)


def test_server_accepts_a_tool_round_trip(client):
    messages = [{"role": "developer", "content": "Use tools."}, {"role": "user", "content": "6*7?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "mul", "arguments": "{\"a\": 6}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "42"}]
    r = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 2


def test_wrong_content_type_says_so(client):
    body = '{"messages": [{"role": "user", "content": "hi"}]}'
    r = client.post("/v1/chat/completions", content=body, headers={"Content-Type": "text/plain"})
    assert r.status_code == 400
    assert r.json()["error"]["message"] == ("the request body must be a JSON object sent with "
                                            "'Content-Type: application/json' (Content-Type: 'text/plain')")
    r = client.post("/v1/completions", json=["not", "an", "object"])
    assert r.status_code == 400 and r.json()["error"]["message"] == "the request body must be a JSON object"


def test_missing_runtime_package_is_a_500_not_the_clients_fault():
    engine = FakeEngine(max_model_len=64)

    def no_jinja(*args, **kwargs):
        raise ImportError("apply_chat_template requires jinja2 to be installed.")

    engine.tokenizer.apply_chat_template = no_jinja
    with TestClient(build_app(engine, "fake-model")) as c:
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 500, r.text
        err = r.json()["error"]
        assert err["type"] == "internal_server_error" and err["param"] is None
        assert "requires jinja2" in err["message"] and "restart the server" in err["message"]
        assert "messages" not in err["message"]
        # the server keeps serving what needs no template
        assert c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1}).status_code == 200


# ---------------------------------------------------------------- the tests' own cache

def test_tests_use_a_temporary_cache():
    from jaxpaged.convert import cache_root
    from tests.conftest import TEST_CACHE

    root = os.environ["JAXPAGED_CACHE"]
    assert root == TEST_CACHE and cache_root() == root
    assert os.path.realpath(root).startswith(os.path.realpath(tempfile.gettempdir()))
    # the only shared piece: the content-addressed native kernel build cache
    assert [e for e in os.listdir(root) if os.path.islink(os.path.join(root, e))] == ["cpu_kernels"]


# ---------------------------------------------------------------- defaults from generation_config.json

GEN = {"bos_token_id": 1, "eos_token_id": 2, "temperature": 0.6, "top_p": 0.9, "top_k": 20, "max_new_tokens": 7,
       "do_sample": True, "num_beams": 1}


def _with_generation_config(src: str, dst, gen: dict) -> str:
    import json
    import shutil
    shutil.copytree(src, dst)
    with open(os.path.join(dst, "generation_config.json"), "w") as f:
        json.dump(gen, f)
    return str(dst)


def test_generation_config_defaults(tmp_path, tiny_llama):
    from jaxpaged.engine_config import EngineConfig
    from jaxpaged.generation_config import sampling_defaults

    model = _with_generation_config(tiny_llama, tmp_path / "m", GEN)
    want = {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "max_tokens": 7}
    assert sampling_defaults(model) == want
    assert sampling_defaults(model, "vllm") == {}
    assert sampling_defaults(tiny_llama, model) == want            # a folder given explicitly
    assert sampling_defaults(tiny_llama) == {}                     # its file has token ids only
    with pytest.raises(ValueError, match="generation_config"):
        EngineConfig(generation_config="nope")


def test_llm_default_sampling_params_from_generation_config(tmp_path, tiny_llama, caplog):
    from jaxpaged import LLM, SamplingParams

    model = _with_generation_config(tiny_llama, tmp_path / "m", dict(GEN, temperature=0.0))
    kw = dict(enforce_eager=True, max_model_len=64, max_num_seqs=2, max_num_batched_tokens=32, num_kv_blocks=16,
              download_dir=str(tmp_path / "cache"))
    llm = LLM(model=model, **kw)
    params = llm.get_default_sampling_params()
    assert (params.temperature, params.top_k, params.max_tokens) == (0.0, 0, 7)   # greedy resets top_k
    out = llm.generate("hello world", use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 7 or out.finish_reason == "stop"
    assert out.token_ids == llm.generate("hello world", params, use_tqdm=False)[0].outputs[0].token_ids
    # no max_model_len: the model's 1024 positions do not fit in 4 blocks, so the pool's 64 tokens are the limit
    kw.pop("max_model_len")
    with caplog.at_level("INFO", logger="jaxpaged.engine"):
        plain = LLM(model=model, generation_config="vllm", **dict(kw, num_kv_blocks=5))
    # the start log says what the pool holds and why max_model_len is not the model's
    assert "KV cache: 4 blocks x 16 tokens = 64 tokens" in caplog.text
    assert "max_model_len is 64, not the model's 1024" in caplog.text
    defaults = plain.get_default_sampling_params()
    assert (defaults.temperature, defaults.max_tokens) == (SamplingParams().temperature, SamplingParams().max_tokens)
    assert plain.llm_engine.max_model_len == 64 and "not the model's 1024" in plain.llm_engine.kv_plan.note
    assert LLM(model=model, **dict(kw, num_kv_blocks=65)).llm_engine.max_model_len == 1024


class _RecordingEngine(FakeEngine):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.seen = []

    def add_request(self, request_id, prompt, params, arrival_time=None):
        self.seen.append(params)
        return super().add_request(request_id, prompt, params, arrival_time)


def test_server_fills_unset_fields_from_generation_config():
    engine = _RecordingEngine(max_model_len=64)
    engine.default_sampling = {"temperature": 0.6, "top_p": 0.9, "max_tokens": 5}
    with TestClient(build_app(engine, "fake-model")) as c:
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                 "ignore_eos": True})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
        assert (engine.seen[-1].temperature, engine.seen[-1].top_p) == (0.6, 0.9)
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "top_p": 0.5,
                                                 "max_tokens": 3, "ignore_eos": True})
        assert r.json()["usage"]["completion_tokens"] == 3
        assert (engine.seen[-1].temperature, engine.seen[-1].top_p) == (0.6, 0.5)   # the request wins


# ---------------------------------------------------------------- KV pool sizing and max_model_len

def _plan(**kw):
    from jaxpaged.engine_config import EngineConfig
    from jaxpaged.kv_sizing import plan_kv_pool
    sizing = {k: kw.pop(k) for k in ("params_bytes", "device_memory") if k in kw}
    # SmolLM2-135M's shape: 8192 positions, 720 KiB per f32 block of 16 tokens
    return plan_kv_pool(EngineConfig(**kw), 8192, 737280, **sizing)


def test_default_max_model_len_is_the_models_when_the_pool_holds_it():
    plan = _plan()
    assert plan.sized_by == "default" and plan.max_model_len == 8192 and plan.note is None
    assert plan.num_blocks == (2 << 30) // 737280                 # the 2 GiB default cap
    small = _plan(kv_cache_memory_bytes=100 * 737280)             # 99 usable blocks = 1584 tokens
    assert (small.num_blocks, small.max_model_len, small.sized_by) == (100, 1584, "kv_cache_memory_bytes")
    assert "max_model_len is 1584, not the model's 8192" in small.note
    assert _plan(max_model_len=1024).max_model_len == 1024
    assert "exceeds the KV pool" in _plan(max_model_len=4096, num_kv_blocks=10).note
    with pytest.raises(ValueError, match="max_model_len: 9000 exceeds"):
        _plan(max_model_len=9000)


def test_gpu_memory_utilization_sizes_the_pool_after_the_params():
    from jaxpaged.engine_config import EngineConfig
    gib = 1 << 30
    plan = _plan(gpu_memory_utilization=0.5, params_bytes=gib, device_memory=8 * gib)
    assert plan.sized_by == "gpu_memory_utilization" and plan.num_blocks == 3 * gib // 737280
    assert _plan(gpu_memory_utilization=0.5, num_kv_blocks=50, device_memory=8 * gib).num_blocks == 50
    with pytest.raises(ValueError, match="gpu_memory_utilization: 0.1 of 8.00 GiB leaves no room"):
        _plan(gpu_memory_utilization=0.1, params_bytes=gib, device_memory=8 * gib)
    with pytest.raises(ValueError, match=r"gpu_memory_utilization: must be in \(0, 1\]"):
        EngineConfig(gpu_memory_utilization=1.5)


def test_memory_flags_on_the_command_line():
    from jaxpaged.server.cli import parse_args
    _, config = parse_args(["--kv-cache-memory-bytes", "4GiB", "--gpu-memory-utilization", "0.8",
                            "--generation-config", "vllm"])
    assert (config.kv_cache_memory_bytes, config.gpu_memory_utilization) == (4 << 30, 0.8)
    assert config.generation_config == "vllm"
    for text, value in (("512MiB", 512 << 20), ("2GB", 2 * 10 ** 9), ("1e9", 10 ** 9), ("1234", 1234)):
        assert parse_args(["--kv-cache-memory-bytes", text])[1].kv_cache_memory_bytes == value
    with pytest.raises(SystemExit):
        parse_args(["--kv-cache-memory-bytes", "lots"])
