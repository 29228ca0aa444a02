"""The HTTP side of the service: the OpenAI app over the engine's handle, run by uvicorn until a signal."""
from __future__ import annotations

import logging
import signal
import socket

import uvicorn

from chitu.config import ChituConfig
from chitu.serve.app import create_app
from chitu.serve.async_engine import AsyncEngine, EngineHandle
from chitu.serve.auth import ApiKeys
from chitu.serve.metrics import ServeMetrics

logger = logging.getLogger(__name__)

# On Ctrl-C / SIGTERM, requests in flight get this long to finish; the rest are aborted.
GRACEFUL_SHUTDOWN_S = 10
# uvicorn refuses connections past serve.max_connections plus this many (health checks, metrics scrapes);
# API requests past serve.max_connections get Chitu's own 503 before that.
EXTRA_CONNECTIONS = 1024


def serve(config: ChituConfig, handle: EngineHandle, keys: ApiKeys, listener: socket.socket) -> None:
    """Wait for the engine, then answer on `listener` until SIGINT / SIGTERM (exit 0) or the engine fails
    (SystemExit naming the cause)."""
    metrics = ServeMetrics()
    fatal: list[Exception] = []
    server: uvicorn.Server | None = None

    def stop_serving(error: Exception) -> None:  # another rank failed: stop, and exit non-zero
        fatal.append(error)
        if server is not None:
            server.should_exit = True

    engine = AsyncEngine(handle, metrics.observe_engine, stop_serving, config.serve.max_waiting_requests,
                         config.serve.max_waiting_tokens)
    engine.start()
    app = create_app(engine, config, metrics, keys)
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
                                           limit_concurrency=config.serve.max_connections + EXTRA_CONNECTIONS))
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then raises the signal again under the handler
    # it found at start; with these, that second delivery does nothing and the process exits with 0.
    for handled in (signal.SIGINT, signal.SIGTERM):
        signal.signal(handled, lambda signum, frame: None)
    host, port = listener.getsockname()[:2]
    logger.info("Serving model %s on http://%s:%d (OpenAI API under /v1)", config.models.name, host, port)
    server.run(sockets=[listener])
    if fatal:
        raise SystemExit(f"Chitu service stopped: {fatal[0]}")
    logger.info("Chitu service stopped")
