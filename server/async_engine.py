"""AsyncLLMEngine: runs a synchronous LLMEngine's step loop in a background thread for asyncio callers.

Flow: a coroutine calls `add_request`, which puts an "add" command on a thread-safe queue and sets
a threading.Event to wake the engine thread; the thread applies the command between steps (the
engine is only ever touched by that thread) and answers through a concurrent Future, so a
ValueError from the engine reaches the caller. While requests are unfinished the thread calls
`engine.step()` back to back; each step's outputs are handed to the event loop in one
`loop.call_soon_threadsafe` call that feeds each request's asyncio.Queue. All requests present at
a step are batched together by the engine (continuous batching). When idle, the thread sleeps
on the Event. `abort` is an "abort" command; a client that goes away calls it, freeing its KV
blocks. `stop()` aborts everything, ends the thread and fails the open streams.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger("jaxpaged.server")


class EngineDeadError(RuntimeError):
    """The engine thread stopped (shutdown or a crash); the request cannot continue."""


class EngineStepError(RuntimeError):
    """engine.step() raised; the requests in that step were aborted (the engine keeps serving)."""


class EngineQueueFullError(RuntimeError):
    """The engine's waiting queue holds max_queued_requests requests; this one was not added."""


@dataclass
class _Timing:
    arrival: float
    first_token: float | None = None


class RequestStream:
    """Outputs of one request as they arrive. Outputs are cumulative, so a slow reader may skip to the latest."""

    def __init__(self, request_id: str):
        self.request_id = request_id
        self._queue: asyncio.Queue = asyncio.Queue()
        self.finished = False
        self.on_finish = None     # called once (no arguments) when the stream ends; set by a router

    def _mark_finished(self) -> None:
        if not self.finished:
            self.finished = True
            if self.on_finish is not None:
                self.on_finish()

    def put(self, item) -> None:  # called on the event loop thread
        self._queue.put_nowait(item)

    async def get(self):
        """The newest pending output (waiting for one); raises what the engine thread sent as an error."""
        item = await self._queue.get()
        while not isinstance(item, BaseException) and not self._queue.empty():
            item = self._queue.get_nowait()
        if isinstance(item, BaseException):
            self._mark_finished()
            raise item
        if getattr(item, "finished", False):
            self._mark_finished()
        return item

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.finished:
            raise StopAsyncIteration
        return await self.get()


@dataclass
class _Command:
    kind: str                     # "add" | "abort" | "call" | "shutdown"
    request_id: str | list[str]
    prompt: Any = None
    params: Any = None
    arrival_time: float | None = None
    future: concurrent.futures.Future | None = None
    stream: RequestStream | None = field(default=None, repr=False)
    lora_request: Any = None      # "add": a LoRARequest (enable_lora)


class AsyncLLMEngine:
    """Wraps any object with the Engine contract (docs/CONTRACTS.md) for asyncio code."""

    def __init__(self, engine, metrics=None, idle_timeout_s: float = 1.0, max_queued_requests: int = 0):
        self.engine = engine
        self.metrics = metrics
        self.max_queued_requests = max_queued_requests     # 0: no bound
        self._idle_timeout_s = idle_timeout_s
        self._commands: queue.SimpleQueue[_Command] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # touched only by the engine thread
        self._streams: dict[str, RequestStream] = {}
        self._timing: dict[str, _Timing] = {}
        self.last_stats = None
        self._added_since_stats = 0     # requests added since last_stats was read (waiting, as far as we know)
        self.dead_error: BaseException | None = None
        self._accepting = True

    # ------------------------------------------------------------ lifecycle (event loop side)

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        if self._thread is not None:
            return
        self._loop = loop or asyncio.get_running_loop()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="jaxpaged-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Aborts every request, ends the engine thread (after its current step) and fails open streams."""
        if self._thread is None:
            return
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)
        self._thread = None

    def begin_shutdown(self) -> None:
        """Thread- and signal-safe: refuse new requests, abort the running ones and end their streams
        with an error now, so open responses finish instead of holding the shutdown up."""
        self._accepting = False
        self._commands.put(_Command("shutdown", ""))
        self._wake.set()

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ------------------------------------------------------------ requests (event loop side)

    async def add_request(self, request_id: str, prompt, params,
                          arrival_time: float | None = None, lora_request=None) -> RequestStream:
        """Queues a request; returns its stream once the engine accepted it (raises its ValueError)."""
        if not self.is_running or not self._accepting:
            raise EngineDeadError("the engine is not running" if self._accepting else "the server is shutting down")
        stream = RequestStream(request_id)
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put(_Command("add", request_id, prompt, params,
                                    arrival_time or time.time(), fut, stream, lora_request=lora_request))
        self._wake.set()
        try:
            await asyncio.wrap_future(fut)
        except asyncio.CancelledError:
            self.abort(request_id)
            raise
        return stream

    async def generate(self, request_id: str, prompt, params) -> AsyncIterator:
        """Yields RequestOutputs until finished; aborts the request if the consumer stops early."""
        stream = await self.add_request(request_id, prompt, params)
        try:
            async for out in stream:
                yield out
        finally:
            if not stream.finished:
                self.abort(request_id)

    async def call_in_engine_thread(self, fn):
        """fn(engine) run on the engine thread between steps (or here when the thread is not running);
        its result or exception comes back (e.g. add_lora / remove_lora)."""
        if not self.is_running:
            return fn(self.engine)
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put(_Command("call", "", params=fn, future=fut))
        self._wake.set()
        return await asyncio.wrap_future(fut)

    def abort(self, request_id: str | list[str]) -> None:
        """Thread-safe; unknown or finished ids are ignored."""
        self._commands.put(_Command("abort", request_id))
        self._wake.set()

    def get_tokenizer(self):
        return self.engine.get_tokenizer()

    @property
    def max_model_len(self) -> int:
        return int(self.engine.max_model_len)

    def get_stats(self):
        """The stats the engine thread saw last (refreshed after every step and command batch)."""
        return self.last_stats

    # ------------------------------------------------------------ engine thread

    def _run(self) -> None:
        try:
            self._refresh_stats()
            while not self._stop.is_set():
                self._wake.clear()
                self._apply_commands()
                if self._stop.is_set():
                    break
                if self._streams or self._has_unfinished():
                    if not self._has_unfinished():
                        # streams without engine work cannot progress: end them rather than hang
                        self._fail_all(EngineDeadError("request vanished from the engine"))
                        continue
                    self._step()
                else:
                    self._wake.wait(self._idle_timeout_s)
        except BaseException as exc:  # noqa: BLE001 - the thread must report, not vanish
            logger.exception("engine thread crashed")
            self.dead_error = exc
            # an EngineDeadError from the engine (a remote replica that died) already says what happened
            self._fail_all(exc if isinstance(exc, EngineDeadError)
                           else EngineDeadError(f"engine thread crashed: {exc!r}"))
        finally:
            self._shutdown_engine()

    def _has_unfinished(self) -> bool:
        return bool(self.engine.has_unfinished_requests())

    def _apply_commands(self) -> None:
        applied = False
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                break
            applied = True
            if cmd.kind == "add":
                self._apply_add(cmd)
            elif cmd.kind == "abort":
                self._apply_abort(cmd.request_id)
            elif cmd.kind == "call":
                self._apply_call(cmd)
            else:
                self._abort_everything()
        if applied:
            self._refresh_stats()

    def _apply_add(self, cmd: _Command) -> None:
        if not cmd.future.set_running_or_notify_cancel():
            return   # the caller went away first; from here on the future cannot be cancelled
        if self._queue_full():
            cmd.future.set_exception(EngineQueueFullError(
                f"the server's queue is full ({self.max_queued_requests} requests waiting); retry later"))
            return
        try:
            lora = {} if cmd.lora_request is None else {"lora_request": cmd.lora_request}
            self.engine.add_request(cmd.request_id, cmd.prompt, cmd.params, arrival_time=cmd.arrival_time, **lora)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            cmd.future.set_exception(exc)
            return
        self._streams[cmd.request_id] = cmd.stream
        self._timing[cmd.request_id] = _Timing(cmd.arrival_time)
        self._added_since_stats += 1
        cmd.future.set_result(None)

    def _apply_call(self, cmd: _Command) -> None:
        if not cmd.future.set_running_or_notify_cancel():
            return
        try:
            cmd.future.set_result(cmd.params(self.engine))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            cmd.future.set_exception(exc)

    def _queue_full(self) -> bool:
        if not self.max_queued_requests:
            return False
        waiting = int(getattr(self.last_stats, "num_waiting", 0) or 0) + self._added_since_stats
        return waiting >= self.max_queued_requests

    def _apply_abort(self, request_id: str | list[str]) -> None:
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        live = [rid for rid in ids if rid in self._streams]
        if not live:
            return
        try:
            self.engine.abort_request(live)
        except Exception:  # noqa: BLE001
            logger.exception("abort_request(%s) failed", live)
        for rid in live:
            self._streams.pop(rid, None)
            self._timing.pop(rid, None)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except EngineDeadError:
            raise    # the engine is gone (a remote replica died): the thread ends, /health reports it
        except Exception as exc:  # noqa: BLE001 - fail the requests in flight, keep serving
            logger.exception("engine.step() failed; aborting %d requests", len(self._streams))
            ids = list(self._streams)
            try:
                self.engine.abort_request(ids)
            except Exception:  # noqa: BLE001
                logger.exception("abort after a failed step failed")
            self._fail_all(EngineStepError(f"engine step failed: {exc!r}"))
            self._refresh_stats()
            return
        now = time.time()
        deliveries = []
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue  # aborted meanwhile
            self._observe(out, now)
            deliveries.append((stream, out))
            if out.finished:
                del self._streams[out.request_id]
                self._timing.pop(out.request_id, None)
        self._refresh_stats()
        if deliveries:
            self._loop.call_soon_threadsafe(_deliver, deliveries)

    def _observe(self, out, now: float) -> None:
        if self.metrics is None:
            return
        timing = self._timing.get(out.request_id)
        if timing is None:
            return
        num_tokens = max((len(c.token_ids) for c in out.outputs), default=0)
        if timing.first_token is None and num_tokens > 0:
            timing.first_token = now
            self.metrics.observe_first_token(timing.arrival, now)
        if out.finished:
            reason = out.outputs[0].finish_reason if out.outputs else None
            self.metrics.observe_finished(reason, timing.arrival, timing.first_token, now, num_tokens)

    def _refresh_stats(self) -> None:
        try:
            self.last_stats = self.engine.get_stats()
        except Exception:  # noqa: BLE001
            logger.exception("engine.get_stats() failed")
            return
        self._added_since_stats = 0
        if self.metrics is not None:
            self.metrics.update_from_stats(self.last_stats)

    def _fail_all(self, exc: BaseException) -> None:
        streams = list(self._streams.values())
        self._streams.clear()
        self._timing.clear()
        if streams and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(_deliver, [(s, exc) for s in streams])

    def _shutdown_engine(self) -> None:
        # reject adds that raced with the stop, abort whatever is still in the engine
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                break
            if cmd.kind == "add" and cmd.future.set_running_or_notify_cancel():
                cmd.future.set_exception(EngineDeadError("the server is shutting down"))
        self._abort_everything()
        self._refresh_stats()

    def _abort_everything(self) -> None:
        ids = list(self._streams)
        if ids:
            try:
                self.engine.abort_request(ids)
            except Exception:  # noqa: BLE001
                logger.exception("abort at shutdown failed")
        self._fail_all(EngineDeadError("the server is shutting down"))


def _deliver(deliveries) -> None:
    for stream, item in deliveries:
        stream.put(item)
