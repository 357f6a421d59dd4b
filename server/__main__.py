"""`python -m jaxpaged.server [--model M] [--host H] [--port P] [engine flags...]`: build the engine, serve with uvicorn.

Shutdown on SIGINT/SIGTERM is uvicorn's: it stops accepting, lets open responses finish for a few
seconds, then runs the app's lifespan exit, which aborts what is left and stops the engine thread.
"""
from __future__ import annotations

import importlib
import logging
import os
import signal
import sys

from .cli import parse_args

logger = logging.getLogger("jaxpaged.server")


def make_engine(config, factory: str | None = None):
    if factory:
        module, _, name = factory.partition(":")
        return getattr(importlib.import_module(module), name or "make_engine")(config)
    from jaxpaged.engine import LLMEngine
    return LLMEngine(config)


def main(argv: list[str] | None = None) -> int:
    args, config = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import uvicorn

    from .app import build_app

    logger.info("loading %s", config.model)
    engine = make_engine(config, args.engine_factory)
    api_key = args.api_key or os.environ.get("JAXPAGED_API_KEY") or None
    app = build_app(engine, args.served_model_name or [config.model], api_key)
    logger.info("serving %s on http://%s:%d", (args.served_model_name or [config.model])[0], args.host, args.port)
    # uvicorn handles SIGINT/SIGTERM itself (graceful shutdown, then the app's lifespan exit) and
    # afterwards re-raises the signal to the handler that was installed before it: make that a clean exit.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _exit_cleanly)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.uvicorn_log_level,
                timeout_graceful_shutdown=5, timeout_keep_alive=5)
    logger.info("server stopped")
    return 0


def _exit_cleanly(signum, frame):
    logger.info("server stopped (%s)", signal.Signals(signum).name)
    sys.exit(0)


if __name__ == "__main__":
    sys.exit(main())
