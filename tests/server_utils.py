"""Helpers for server tests: start `python -m jaxpaged.server` as a real process, read /metrics, wait for things."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")


def parse_metrics(text: str) -> dict[str, float]:
    """{"name{labels}": value, ...} and, summed over label sets, {"name": value}."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line.strip())
        if not m:
            continue
        name, labels, value = m.group(1), m.group(2) or "", float(m.group(3))
        out[name + labels] = value
        if labels:
            out[name] = out.get(name, 0.0) + value
    return out


def make_fake_engine(config):
    """--engine-factory target: a FakeEngine sized by the EngineConfig (for server-process tests without a model)."""
    from tests.fake_engine import FakeEngine

    return _maybe_gated(FakeEngine(max_model_len=config.max_model_len or 256, block_size=config.block_size,
                                   num_kv_blocks=config.num_kv_blocks or 129, max_num_seqs=config.max_num_seqs,
                                   step_delay=float(os.environ.get("FAKE_ENGINE_STEP_DELAY", "0.002")),
                                   model=config.model))


def make_gated_engine(config):
    """--engine-factory target: the real LLMEngine, its steps rationed by $JAXPAGED_TEST_STEP_GATE (StepGate)."""
    from jaxpaged.engine import LLMEngine

    return _maybe_gated(LLMEngine(config))


def _maybe_gated(engine):
    path = os.environ.get(StepGate.ENV)
    return GatedEngine(engine, path) if path else engine


class StepGate:
    """Lets a test decide how many engine steps a server process may run, so that a test of what happens
    mid-request (a client disconnect) does not race the model: no file = steps run freely; a file holding
    n = n more steps, then the engine stands still (requests stay queued or half-done) until told more."""
    ENV = "JAXPAGED_TEST_STEP_GATE"

    def __init__(self, path: str):
        self.path = path

    def allow(self, steps: int) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.write(str(steps))
        os.replace(tmp, self.path)       # atomic: the engine thread never reads a half-written file

    def open(self) -> None:
        if os.path.exists(self.path):
            os.remove(self.path)


class GatedEngine:
    """Wraps an engine (the Engine contract); step() runs only while the StepGate file allows it."""

    def __init__(self, engine, gate_path: str):
        self._engine = engine
        self._gate = StepGate(gate_path)

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def step(self):
        try:
            with open(self._gate.path) as f:
                left = int(f.read().strip() or 0)
        except FileNotFoundError:
            return self._engine.step()
        if left <= 0:
            time.sleep(0.005)            # standing still: the engine thread keeps applying adds and aborts
            return []
        self._gate.allow(left - 1)
        return self._engine.step()


class ServerProcess:
    """A `python -m jaxpaged.server` child process on 127.0.0.1:<free port>; `stop()` sends SIGTERM."""

    def __init__(self, args: list[str], *, startup_timeout: float = 300.0, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w+", prefix="jaxpaged-server-", suffix=".log", delete=False)
        full_env = dict(os.environ)
        full_env.setdefault("JAX_PLATFORMS", "cpu")
        full_env["PYTHONPATH"] = REPO_ROOT + os.pathsep + full_env.get("PYTHONPATH", "")
        full_env.update(env or {})
        cmd = [sys.executable, "-m", "jaxpaged.server", "--host", "127.0.0.1", "--port", str(self.port),
               "--uvicorn-log-level", "warning", *args]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=full_env, cwd=REPO_ROOT)
        try:
            wait_for(self._healthy, startup_timeout, interval=0.2, what=f"server {' '.join(args)} to start")
        except BaseException:
            self.stop(timeout=5)
            raise RuntimeError(f"server did not start:\n{self.output()[-4000:]}") from None

    def _healthy(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()[-4000:]}")
        try:
            return httpx.get(self.url + "/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def output(self) -> str:
        self.log.flush()
        with open(self.log.name) as f:
            return f.read()

    def metrics(self) -> dict[str, float]:
        return parse_metrics(httpx.get(self.url + "/metrics", timeout=10).text)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, wait; SIGKILL if it does not exit in time. Returns the exit code (None if killed)."""
        if self.proc.poll() is not None:
            return self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            return None
