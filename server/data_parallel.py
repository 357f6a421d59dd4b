"""DataParallelEngine: N engine replicas (each in its own process(es)) behind the server's one async-engine API.

Each replica is an AsyncLLMEngine (its own engine thread) over a RemoteEngine, so streaming,
aborts, shutdown and per-request metrics work as with one local engine. This class adds the
routing (router.py) and remembers which replica holds each request id, so an abort (a client
that disconnects, a stopped stream) reaches the replica that holds the request. A replica whose
process dies fails its requests with EngineDeadError (a 503, or an SSE error event) and is no
longer routed to; /health answers 503 naming it while the other replicas keep serving.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

from .async_engine import AsyncLLMEngine, EngineDeadError, EngineQueueFullError
from .router import Router, request_cost

logger = logging.getLogger("jaxpaged.server")

HEALTH_PING_TIMEOUT_S = 10.0


class DataParallelEngine:
    is_async_engine = True   # build_app uses it as is (no AsyncLLMEngine wrapper)

    def __init__(self, replicas: list[AsyncLLMEngine], block_size: int, on_stop=None):
        self.replicas = replicas
        self.router = Router(len(replicas), block_size)
        self._owner: dict[str, tuple[int, int]] = {}   # request id -> (replica, routed cost)
        self._on_stop = on_stop
        self.metrics = None

    # ------------------------------------------------------------ what the app reads

    @property
    def engine(self):
        """Replica 0's engine (config, model_config: the same on every replica)."""
        return self.replicas[0].engine

    def get_tokenizer(self):
        return self.replicas[0].get_tokenizer()

    @property
    def max_model_len(self) -> int:
        return self.replicas[0].max_model_len

    def get_stats(self) -> list:
        return [r.get_stats() for r in self.replicas]

    @property
    def dead_error(self) -> BaseException | None:
        """The first dead replica's error (the app's /health then answers 503)."""
        dead = self.dead_replicas()
        return dead[0][1] if dead else None

    def dead_replicas(self) -> list[tuple[int, BaseException]]:
        out = []
        for i, r in enumerate(self.replicas):
            err = r.dead_error or getattr(r.engine, "dead", None)
            if err is None and r._thread is not None and not r.is_running:
                err = EngineDeadError(f"replica {i}: engine thread ended")
            if err is not None:
                out.append((i, err))
        return out

    async def check_health(self) -> list[tuple[int, BaseException]]:
        """Pings every replica's processes (a dead idle replica is found here) and returns the dead ones."""
        async def ping(r):
            check = getattr(r.engine, "ping_workers", None)
            if check is None:   # an in-process engine: its thread reports it
                return
            try:
                await asyncio.wait_for(asyncio.to_thread(check), HEALTH_PING_TIMEOUT_S)
            except Exception as exc:  # noqa: BLE001 - marks the replica dead
                if getattr(r.engine, "dead", None) is None:
                    r.engine.dead = EngineDeadError(f"{r.engine.name} does not answer: {exc!r}")
        await asyncio.gather(*(ping(r) for r in self.replicas if getattr(r.engine, "dead", None) is None))
        return self.dead_replicas()

    @property
    def max_queued_requests(self) -> int:
        return self.replicas[0].max_queued_requests

    @max_queued_requests.setter
    def max_queued_requests(self, value: int) -> None:
        """The waiting-queue bound (429 beyond it) applies to each replica."""
        for r in self.replicas:
            r.max_queued_requests = value

    # ------------------------------------------------------------ lifecycle

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        loop = loop or asyncio.get_running_loop()
        for r in self.replicas:
            r.start(loop)

    def stop(self, timeout: float = 30.0) -> None:
        for r in self.replicas:
            r.stop(timeout)
        if self._on_stop is not None:
            self._on_stop()
            self._on_stop = None

    def begin_shutdown(self) -> None:
        for r in self.replicas:
            r.begin_shutdown()

    @property
    def is_running(self) -> bool:
        return any(r.is_running for r in self.replicas)

    # ------------------------------------------------------------ requests

    async def add_request(self, request_id: str, prompt, params, arrival_time: float | None = None):
        """Routes the request, adds it on that replica; a replica found dead or with a full queue here is skipped
        (the request fails only when no replica takes it)."""
        arrival_time = arrival_time or time.time()
        prompt_ids = prompt if isinstance(prompt, list) else None
        cost = request_cost(len(prompt_ids) if prompt_ids is not None else 0, params)
        last_error, full = None, set()
        while True:
            alive = [self._can_take(r) and i not in full for i, r in enumerate(self.replicas)]
            if not any(alive):
                raise last_error or EngineDeadError("no data-parallel replica is running")
            idx = self.router.choose(prompt_ids, cost, alive)
            try:
                stream = await self.replicas[idx].add_request(request_id, prompt, params, arrival_time)
            except EngineQueueFullError as exc:
                full.add(idx)
                last_error = exc
                continue
            except EngineDeadError as exc:
                if not getattr(self.replicas[idx], "_accepting", True):
                    raise     # the server is shutting down
                logger.warning("replica %d is dead, routing %s elsewhere: %s", idx, request_id, exc)
                self.replicas[idx].dead_error = self.replicas[idx].dead_error or exc
                last_error = exc
                continue
            self.router.assign(idx, prompt_ids, cost)
            self._owner[request_id] = (idx, cost)
            stream.on_finish = lambda: self._release(request_id)
            return stream

    async def generate(self, request_id: str, prompt, params) -> AsyncIterator:
        stream = await self.add_request(request_id, prompt, params)
        try:
            async for out in stream:
                yield out
        finally:
            if not stream.finished:
                self.abort(request_id)

    def abort(self, request_id: str | list[str]) -> None:
        """Sends each id's abort to the replica that holds it; unknown or finished ids are ignored."""
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        by_replica: dict[int, list[str]] = {}
        for rid in ids:
            owner = self._owner.get(rid)
            if owner is not None:
                by_replica.setdefault(owner[0], []).append(rid)
                self._release(rid)
        for idx, rids in by_replica.items():
            self.replicas[idx].abort(rids)

    def replica_of(self, request_id: str) -> int | None:
        owner = self._owner.get(request_id)
        return owner[0] if owner else None

    def _release(self, request_id: str) -> None:
        owner = self._owner.pop(request_id, None)
        if owner is not None:
            self.router.release(*owner)

    @staticmethod
    def _can_take(replica: AsyncLLMEngine) -> bool:
        return (replica.is_running and replica.dead_error is None
                and getattr(replica.engine, "dead", None) is None)
