"""An engine in other processes: `EngineWorker` hosts an LLMEngine; `RemoteEngine` drives a group of them.

`RemoteEngine` has the synchronous Engine contract (docs/CONTRACTS.md), so the server's
AsyncLLMEngine runs it on its engine thread exactly like a local LLMEngine; every call is one
round trip. A group is one engine: a single process (a data-parallel replica), or the
jax.distributed processes of one tensor-parallel engine spread over hosts. Rank 0 is the driver:
each command (add, abort, step) is sent to every rank, in the same order, and every rank's
deterministic scheduler then makes the same batch, so the SPMD step runs in lockstep (its
collectives cross the processes); rank 0's reply is the answer.

Transports (`WorkerHandle`): a Ray actor (ray_utils.py) or a local child process over a pipe
(`ProcessWorker`, the `mp` backend). A worker that dies makes every later call raise
EngineDeadError, which ends the replica's engine thread; /health then reports it.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import traceback

logger = logging.getLogger("jaxpaged.server")

# exceptions a worker hands back by type and message (the request's fault; the server makes them 4xx)
_PASSED_ERRORS = {cls.__name__: cls for cls in (ValueError, TypeError, OverflowError)}


class EngineWorker:
    """Lives in the worker process. `start` builds the engine (after jax.distributed, if several ranks)."""

    def __init__(self):
        self.engine = None

    def call(self, method: str, args: tuple):
        """("ok", value) or ("error", exception class name, message): never raises across the transport."""
        if method.startswith("_") or not callable(getattr(self, method, None)) or method == "call":
            return "error", "ValueError", f"unknown method {method!r}"
        try:
            return "ok", getattr(self, method)(*args)
        except tuple(_PASSED_ERRORS.values()) as exc:
            return "error", type(exc).__name__, str(exc)
        except Exception as exc:  # noqa: BLE001 - reported to the driver with its traceback
            return "error", "RuntimeError", f"{exc!r}\n{traceback.format_exc()}"

    def start(self, config, rank: int = 0, world_size: int = 1, coordinator: str | None = None,
              cpus: list[int] | None = None, factory: str | None = None) -> dict:
        """Builds this rank's engine; `factory` ("module:callable", the server's test hook --engine-factory)
        builds something with the Engine contract instead of an LLMEngine."""
        if cpus:
            os.sched_setaffinity(0, cpus)   # this replica's CPU share (before XLA sizes its thread pools)
        if world_size > 1:
            import jax
            jax.distributed.initialize(coordinator_address=coordinator, num_processes=world_size, process_id=rank)
        if factory:
            import importlib
            module, _, name = factory.partition(":")
            self.engine = getattr(importlib.import_module(module), name or "make_engine")(config)
        else:
            from jaxpaged.compilation_cache import enable_compilation_cache
            from jaxpaged.engine import LLMEngine
            enable_compilation_cache(config)     # this process's entry point: it sets the process-wide JAX config
            self.engine = LLMEngine(config, progress=False)
        return dict(model_config=self.engine.model_config, max_model_len=self.engine.max_model_len,
                    stats=self.engine.get_stats(), pid=os.getpid(), default_sampling=self.engine.default_sampling)

    def free_address(self) -> str:
        """host:port on this worker's host for the jax.distributed coordinator (rank 0 serves it)."""
        import socket
        host = os.environ.get("JAXPAGED_NODE_IP") or _node_ip()
        with socket.socket() as s:
            s.bind((host, 0))
            return f"{host}:{s.getsockname()[1]}"

    def get_tokenizer(self):
        return self.engine.get_tokenizer()

    def add_request(self, request_id, prompt, params, arrival_time):
        """The engine's stats after the add (the driver's get_stats() must count the request as waiting)."""
        self.engine.add_request(request_id, prompt, params, arrival_time=arrival_time)
        return self.engine.get_stats()

    def abort_request(self, request_ids) -> tuple[bool, object]:
        """(unfinished requests remain, stats): the freed blocks show at once, no step follows an idle abort."""
        self.engine.abort_request(request_ids)
        return self.engine.has_unfinished_requests(), self.engine.get_stats()

    def step(self) -> tuple[list, bool, object]:
        """(outputs, unfinished requests remain, stats) after one engine step."""
        outputs = self.engine.step() if self.engine.has_unfinished_requests() else []
        return outputs, self.engine.has_unfinished_requests(), self.engine.get_stats()

    def ping(self) -> int:
        return os.getpid()


def _node_ip() -> str:
    try:
        import ray
        return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - no Ray: a local process
        return "127.0.0.1"


class ProcessWorker:
    """WorkerHandle over a spawned child process (the `mp` backend): requests and replies over one pipe."""

    def __init__(self, name: str, env: dict[str, str] | None = None):
        ctx = multiprocessing.get_context("spawn")
        self.name = name
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_process_main, args=(child, env or {}), name=name, daemon=True)
        self._proc.start()
        child.close()

    def submit(self, method: str, args: tuple):
        try:
            self._conn.send((method, args))
        except (OSError, EOFError, BrokenPipeError):
            pass    # the reply read in wait() reports the dead process
        return None

    def wait(self, _pending):
        try:
            return self._conn.recv()
        except (OSError, EOFError) as exc:
            raise WorkerDiedError(f"{self.name} (pid {self._proc.pid}) died: exit code {self._proc.exitcode}") \
                from exc

    def is_alive(self) -> bool:
        return self._proc.is_alive()

    def kill(self) -> None:
        if self._proc.is_alive():
            self._proc.kill()
        self._proc.join(10)
        self._conn.close()


def _process_main(conn, env: dict[str, str]) -> None:
    os.environ.update(env)
    worker = EngineWorker()
    while True:
        try:
            method, args = conn.recv()
        except (EOFError, OSError):
            return    # the server went away
        if method == "shutdown":
            conn.send(("ok", None))
            return
        conn.send(worker.call(method, args))


class WorkerDiedError(RuntimeError):
    """The transport lost the worker process."""


class RemoteEngine:
    """The Engine contract over a group of workers (rank 0 first); used by one engine thread only."""

    def __init__(self, workers: list, config, name: str = "engine"):
        from .async_engine import EngineDeadError
        self._dead_error_cls = EngineDeadError
        self.workers = workers
        self.config = config
        self.name = name
        self.dead: BaseException | None = None
        self._unfinished = False
        self._stats = None
        self.model_config = None
        self.max_model_len = None
        self.default_sampling: dict = {}
        self._tokenizer = None

    def start(self, cpus_per_rank: list | None = None, factory: str | None = None) -> None:
        """Builds the engine on every rank (concurrently: jax.distributed waits for all of them).

        cpus_per_rank[r]: the cores rank r is pinned to (None: not pinned)."""
        world = len(self.workers)
        coordinator = self._call_one(0, "free_address") if world > 1 else None
        cpus = cpus_per_rank or [None] * world
        info = self._broadcast("start", lambda rank: (self.config, rank, world, coordinator, cpus[rank], factory))
        self.model_config, self.max_model_len, self._stats = info["model_config"], info["max_model_len"], info["stats"]
        self.pid = info["pid"]
        self.default_sampling = info["default_sampling"]      # the model's generation_config.json defaults

    # ------------------------------------------------------------ the Engine contract

    def get_tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = self._call_one(0, "get_tokenizer")
        return self._tokenizer

    def add_request(self, request_id, prompt, params=None, arrival_time=None) -> None:
        self._stats = self._broadcast("add_request", lambda _: (request_id, prompt, params, arrival_time))
        self._unfinished = True

    def abort_request(self, request_id) -> None:
        self._unfinished, self._stats = self._broadcast("abort_request", lambda _: (request_id,))

    def has_unfinished_requests(self) -> bool:
        return self._unfinished

    def step(self) -> list:
        outputs, self._unfinished, self._stats = self._broadcast("step", lambda _: ())
        return outputs

    def get_stats(self):
        """The stats every reply carries (as of the last add, abort or step): no round trip."""
        return self._stats

    def ping_workers(self) -> None:
        """Thread-safe liveness check (no engine call): marks the engine dead when a worker process is gone."""
        for rank, w in enumerate(self.workers):
            if not w.is_alive():
                self.dead = self.dead or self._dead_error_cls(f"{self.name} died: rank {rank} ({w.name}) is gone")
                raise self.dead

    def shutdown(self) -> None:
        for w in self.workers:
            try:
                w.kill()
            except Exception:  # noqa: BLE001 - best effort at exit
                logger.exception("stopping %s failed", self.name)

    # ------------------------------------------------------------ transport

    def _call_one(self, rank: int, method: str, *args):
        return self._unwrap(self._wait(self.workers[rank], self.workers[rank].submit(method, args)))

    def _broadcast(self, method: str, args_for):
        """Sends method(*args_for(rank)) to every rank, then waits for all; rank 0's value (errors: rank 0's)."""
        if self.dead is not None:
            raise self.dead
        pending = [w.submit(method, args_for(rank)) for rank, w in enumerate(self.workers)]
        replies = [self._wait(w, p) for w, p in zip(self.workers, pending)]
        return self._unwrap(replies[0])

    def _wait(self, worker, pending):
        try:
            return worker.wait(pending)
        except WorkerDiedError as exc:
            self.dead = self._dead_error_cls(f"{self.name} died: {exc}")
            raise self.dead from None

    @staticmethod
    def _unwrap(reply):
        if reply[0] == "ok":
            return reply[1]
        _, cls_name, message = reply
        raise _PASSED_ERRORS.get(cls_name, RuntimeError)(message)
