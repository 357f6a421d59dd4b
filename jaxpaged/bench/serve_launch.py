"""Servers that `bench serve --backend jaxpaged,vllm` starts in turn: their command lines and lifetimes.

Both servers get the same model, dtype, max-model-len, max-num-seqs, max-num-batched-tokens, KV cache
size and seed (`ServerSpec`). jaxpaged runs `python -m jaxpaged.server`; vLLM runs in its own
virtualenv (`--vllm-python`, as in `bench throughput`) as `vllm.entrypoints.openai.api_server` on the HF directory that
bench_hf exports from the built-in GGUF, with its CPU threads pinned to both cores (vllm_backend.VLLM_ENV)
and `VLLM_CPU_KVCACHE_SPACE` set to the same GiB as jaxpaged's `--kv-cache-memory-bytes`.

`LaunchedServer` is a context manager: the server runs in its own process group (vLLM forks an engine
core process) with stdout/stderr in a temporary log file; leaving the block, for any reason (an error,
Ctrl-C, a SIGTERM to this process), terminates the whole group (SIGTERM, then SIGKILL after a grace period). The log is deleted
after a clean run and kept, its path printed, when the server failed to start or the block raised.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

SERVE_BACKENDS = ("jaxpaged", "vllm")


@dataclass(frozen=True)
class ServerSpec:
    """What a launched server is started with (vLLM's flag names); None: the server's own default.
    `bench serve --backend` sets every field, so that both servers get the same values."""
    model: str
    port: int
    dtype: str | None = None
    max_model_len: int | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    kv_cache_space_gib: float | None = None
    seed: int | None = None
    served_model_name: str | None = None
    extra_args: tuple[str, ...] = ()       # appended last (they override the above)

    def engine_flags(self) -> list[str]:
        """The flags both servers spell alike, for the fields that are set."""
        out = []
        for flag, value in (("--dtype", self.dtype), ("--max-model-len", self.max_model_len),
                            ("--max-num-seqs", self.max_num_seqs),
                            ("--max-num-batched-tokens", self.max_num_batched_tokens), ("--seed", self.seed)):
            if value is not None:
                out += [flag, str(value)]
        return out


def jaxpaged_command(spec: ServerSpec, python: str = sys.executable) -> tuple[list[str], dict]:
    """(argv, extra environment) of `python -m jaxpaged.server` for `spec`."""
    cmd = [python, "-m", "jaxpaged.server", "--model", spec.model, "--host", "127.0.0.1", "--port", str(spec.port),
           *spec.engine_flags(), "--uvicorn-log-level", "warning"]
    if spec.kv_cache_space_gib is not None:
        cmd += ["--kv-cache-memory-bytes", f"{spec.kv_cache_space_gib:g}GiB"]
    if spec.served_model_name:
        cmd += ["--served-model-name", spec.served_model_name]
    return cmd + list(spec.extra_args), {}


def vllm_command(spec: ServerSpec, vllm_python: str, model_dir: str) -> tuple[list[str], dict]:
    """(argv, extra environment) of vLLM's OpenAI server (through `vllm_python`) on the HF directory `model_dir`.

    The served name is the jaxpaged model name, so both servers answer to the same name;
    `--generation-config vllm` keeps the model's generation_config.json out of the request defaults."""
    from jaxpaged.bench.vllm_backend import VLLM_ENV

    # not the `vllm serve` CLI: it reads importlib.metadata.version("vllm"), absent when the distribution
    # is vllm-cpu; the OpenAI api_server module takes the same flags (and --model)
    cmd = [vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir, "--host", "127.0.0.1",
           "--port", str(spec.port), *spec.engine_flags(), "--served-model-name", spec.served_model_name or spec.model,
           "--generation-config", "vllm", "--uvicorn-log-level", "warning", "--disable-uvicorn-access-log"]
    # PYTHONPATH unset: vLLM's venv must not see this checkout's packages
    env = {**VLLM_ENV, "PYTHONPATH": None}
    if spec.kv_cache_space_gib is not None:
        env["VLLM_CPU_KVCACHE_SPACE"] = f"{spec.kv_cache_space_gib:g}"
    return cmd + list(spec.extra_args), env


def backend_command(backend: str, spec: ServerSpec, vllm_python: str | None = None) -> tuple[list[str], dict]:
    if backend == "jaxpaged":
        return jaxpaged_command(spec)
    if backend == "vllm":
        if not vllm_python or not os.path.exists(vllm_python):
            raise FileNotFoundError(f"--vllm-python {vllm_python}: no such interpreter "
                                    f"(see jaxpaged/bench/vllm_backend.py for the install)")
        from jaxpaged.bench.hf_backend import export_hf_dir
        return vllm_command(spec, vllm_python, export_hf_dir(spec.model))
    raise ValueError(f"--backend: unknown backend {backend!r}; choose from {SERVE_BACKENDS}")


def launch_jaxpaged(model: str, base_url: str, server_args: str = "") -> "LaunchedServer":
    """`python -m jaxpaged.server` with its own defaults and `server_args` (`bench serve/load --launch`)."""
    spec = ServerSpec(model=model, port=_port(base_url), extra_args=tuple(server_args.split()))
    cmd, env = jaxpaged_command(spec)
    return LaunchedServer(cmd, env, base_url, name="jaxpaged")


def _port(base_url: str) -> int:
    return int(base_url.rstrip("/").rsplit(":", 1)[-1])


class LaunchedServer:
    """`with LaunchedServer(cmd, env, base_url): ...`: started, healthy inside the block, stopped after it."""

    def __init__(self, cmd: list[str], env: dict[str, str | None], base_url: str, *, name: str = "server",
                 start_timeout: float = 1800.0, stop_timeout: float = 30.0):
        self.cmd, self.env, self.base_url, self.name = cmd, env, base_url.rstrip("/"), name
        self.start_timeout, self.stop_timeout = start_timeout, stop_timeout
        self.proc: subprocess.Popen | None = None
        self.log_path: str | None = None

    def __enter__(self) -> "LaunchedServer":
        if _healthy(self.base_url):
            raise RuntimeError(f"{self.base_url} already answers /health: another server holds the port; "
                               f"stop it or pick another --base-url port")
        fd, self.log_path = tempfile.mkstemp(prefix=f"bench-serve-{self.name}-", suffix=".log")
        env = {**os.environ, **self.env}
        env = {k: v for k, v in env.items() if v is not None}     # None in self.env: unset
        self._trap_sigterm()
        with os.fdopen(fd, "w") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True, cwd=tempfile.gettempdir())
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            self._restore_sigterm()
            self._keep_log()
            raise
        return self

    def _trap_sigterm(self) -> None:
        """The server runs in its own session, so a SIGTERM to this process (`timeout`, `kill`) would
        orphan it: turn SIGTERM into SystemExit while the server lives, so that __exit__ stops it."""
        self._old_sigterm = None
        if threading.current_thread() is threading.main_thread():
            def _exit(signum, frame):
                raise SystemExit(128 + signum)
            self._old_sigterm = signal.signal(signal.SIGTERM, _exit)

    def _restore_sigterm(self) -> None:
        if self._old_sigterm is not None:
            signal.signal(signal.SIGTERM, self._old_sigterm)
            self._old_sigterm = None

    def __exit__(self, exc_type, exc, tb) -> None:
        self.stop()
        self._restore_sigterm()
        if exc_type is None:
            os.unlink(self.log_path)
        else:
            self._keep_log()

    def _wait_healthy(self) -> None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < self.start_timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} server exited with {self.proc.returncode} before /health "
                                   f"answered 200: {' '.join(self.cmd)}")
            if _healthy(self.base_url):
                return
            time.sleep(1.0)
        raise RuntimeError(f"{self.name} server: no /health 200 in {self.start_timeout:.0f} s")

    def stop(self) -> None:
        """Terminates the server's process group (SIGTERM, then SIGKILL); idempotent."""
        if self.proc is None or self.proc.returncode is not None:
            return
        _signal_group(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=self.stop_timeout)
        except subprocess.TimeoutExpired:
            pass
        _signal_group(self.proc.pid, signal.SIGKILL)     # also children that outlived the leader
        self.proc.wait()

    def _keep_log(self) -> None:
        tail = ""
        try:
            with open(self.log_path, errors="replace") as f:
                tail = "".join(f.readlines()[-15:])
        except OSError:
            pass
        print(f"{self.name} server log kept in {self.log_path}; its end:\n{tail}", file=sys.stderr, flush=True)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _healthy(base_url: str) -> bool:
    import httpx
    try:
        return httpx.get(base_url.rstrip("/") + "/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
