"""`python -m jaxpaged.server [--model M] [--host H] [--port P] [engine flags...]`: build the engine, serve with uvicorn.

Shutdown on SIGINT/SIGTERM: uvicorn stops accepting connections; at the same moment the async
engine aborts every request in flight and ends their responses (an SSE error event then [DONE],
or a 503), so uvicorn's grace period (5 s) is rarely needed; the app's lifespan exit then stops the
engine thread and the process exits with status 0.
"""
from __future__ import annotations

import importlib
import logging
import os
import signal
import sys
import threading

import uvicorn
from fastapi.middleware.cors import CORSMiddleware

from .cli import ignored_flags_given, parse_args, uses_remote_engines

logger = logging.getLogger("jaxpaged.server")


def make_engine(config, factory: str | None = None):
    if factory:
        module, _, name = factory.partition(":")
        return getattr(importlib.import_module(module), name or "make_engine")(config)
    from jaxpaged.compilation_cache import enable_compilation_cache
    from jaxpaged.engine import LLMEngine
    enable_compilation_cache(config)     # process-wide JAX config belongs to the entry point
    # /health answers once the smallest step shape is compiled; the rest compile in the background
    # (a request needing one of them compiles it at its step)
    engine = LLMEngine(config, background_warmup=True)
    threading.Thread(target=_preload_chat_tokenizer, args=(engine,), name="jaxpaged-tokenizer", daemon=True).start()
    return engine


def _preload_chat_tokenizer(engine) -> None:
    """A cache entry's tokenizer (jaxpaged/tokenizer.py) loads transformers for chat templates at their
    first use: load it once the background warmup is over, so the first chat request does not wait for
    the import (nor slow the start)."""
    from jaxpaged.tokenizer import CachedTokenizer

    engine.warmup_done.wait()           # never set when the server stops first: then nothing is loaded
    if isinstance(engine.tokenizer, CachedTokenizer):
        try:
            engine.tokenizer.hf
        except Exception:       # noqa: BLE001 - the first chat request then reports it
            logger.exception("could not load transformers' tokenizer for chat templates")


def main(argv: list[str] | None = None) -> int:
    args, config = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from .app import build_app

    for flag in ignored_flags_given(args):
        logger.warning("%s is accepted for vLLM compatibility and ignored", flag)
    logger.info("loading %s", config.model)
    names = args.served_model_name or [config.model]
    if uses_remote_engines(args):
        from .metrics import ServerMetrics
        from .replicas import build_distributed_engine
        if args.data_parallel_backend == "ray" or args.distributed_executor_backend == "ray":
            from .ray_utils import require_ray
            try:
                require_ray()
            except RuntimeError as exc:
                logger.error("%s", exc)
                return 2
        engine = build_distributed_engine(args, config, ServerMetrics(names[0], args.data_parallel_size))
    else:
        engine = make_engine(config, args.engine_factory)
    api_key = args.api_key or os.environ.get("JAXPAGED_API_KEY") or None
    app = build_app(engine, names, api_key, docs=not args.disable_fastapi_docs, limits=args.limits,
                    tool_call_parser=args.tool_call_parser, enable_auto_tool_choice=args.enable_auto_tool_choice,
                    lora_modules=args.lora_modules, allow_runtime_lora_updating=args.allow_runtime_lora_updating)
    app.add_middleware(CORSMiddleware, allow_origins=args.allowed_origins, allow_methods=args.allowed_methods,
                       allow_headers=args.allowed_headers, allow_credentials=args.allow_credentials)
    logger.info("serving %s on http://%s:%d", (args.served_model_name or [config.model])[0], args.host, args.port)
    # uvicorn handles SIGINT/SIGTERM itself (graceful shutdown, then the app's lifespan exit) and
    # afterwards re-raises the signal to the handler that was installed before it: make that a clean exit.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _exit_cleanly)
    server_config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.uvicorn_log_level,
                                   timeout_graceful_shutdown=5, timeout_keep_alive=5,
                                   root_path=args.root_path or "", ssl_keyfile=args.ssl_keyfile,
                                   ssl_certfile=args.ssl_certfile,
                                   access_log=not args.disable_uvicorn_access_log)
    try:
        _Server(server_config, app.state.async_engine).run()
    finally:        # (uvicorn's re-raised signal exits through _exit_cleanly, from inside run())
        stop_warmup = getattr(engine, "stop_warmup", None)
        if stop_warmup is not None:         # no compile may be running while the interpreter exits
            stop_warmup()
    logger.info("server stopped")
    return 0


class _Server(uvicorn.Server):
    """uvicorn.Server that, when a shutdown signal arrives, also ends the open streams at once
    (the engine aborts their requests) instead of letting them run into the grace timeout."""

    def __init__(self, config, async_engine):
        super().__init__(config)
        self.async_engine = async_engine

    def handle_exit(self, sig, frame):
        self.async_engine.begin_shutdown()
        super().handle_exit(sig, frame)


def _exit_cleanly(signum, frame):
    logger.info("server stopped (%s)", signal.Signals(signum).name)
    sys.exit(0)


if __name__ == "__main__":
    sys.exit(main())
