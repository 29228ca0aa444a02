"""`python -m chitu …` / `torchrun … -m chitu …`: load the model, then serve it over HTTP until a signal."""
from __future__ import annotations

import functools
import logging
import os
import signal
import socket

import uvicorn

from chitu.config import ChituConfig, hydra_entry
from chitu.engine.engine import LLMEngine
from chitu.serve.app import create_app
from chitu.serve.async_engine import AsyncEngine
from chitu.serve.auth import ApiKeys
from chitu.serve.engine_process import EngineProcess
from chitu.serve.engine_thread import EngineThread
from chitu.serve.metrics import ServeMetrics

logger = logging.getLogger(__name__)

# On Ctrl-C / SIGTERM, requests in flight get this long to finish; the rest are aborted.
GRACEFUL_SHUTDOWN_S = 10
# uvicorn refuses connections past serve.max_connections plus this many (health checks, metrics scrapes);
# API requests past serve.max_connections get Chitu's own 503 before that.
EXTRA_CONNECTIONS = 1024


@hydra_entry
def main(config: ChituConfig) -> None:
    logger.info("Loading model %s from %s", config.models.name, config.models.checkpoint_path())
    if int(os.environ.get("RANK", "0")) != 0:
        follow_driver(config)
        return
    keys = ApiKeys(config.serve)  # first: a missing key file or a port in use fails before loading
    listener = bind(config.serve.host, config.serve.port)
    metrics = ServeMetrics()
    fatal: list[Exception] = []
    server: uvicorn.Server | None = None

    def stop_serving(error: Exception) -> None:  # another rank failed: stop, and exit non-zero
        fatal.append(error)
        if server is not None:
            server.should_exit = True

    handle = EngineProcess(config) if config.serve.engine_process else EngineThread(functools.partial(LLMEngine, config))
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


def bind(host: str, port: int) -> socket.socket:
    """The server's socket, bound before the model loads so that a port in use fails at once and the log
    can name the real port (serve.port=0 takes a free one). It listens only once serving starts (asyncio
    calls listen), so clients are refused, not left hanging, while the model loads."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise SystemExit(f"cannot listen on {host}:{port}: {e.strerror}") from None
    return sock


def follow_driver(config: ChituConfig) -> None:
    """Ranks other than 0 compute rank 0's steps until it shuts down."""
    LLMEngine(config).follow_driver()
