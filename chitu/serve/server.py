"""`python -m chitu …` / `torchrun … -m chitu …`: load the model, then serve it over HTTP until a signal."""
from __future__ import annotations

import functools
import logging
import os
import signal

import uvicorn

from chitu.config import ChituConfig, hydra_entry
from chitu.engine.engine import LLMEngine
from chitu.serve.app import create_app
from chitu.serve.async_engine import AsyncEngine
from chitu.serve.metrics import ServeMetrics

logger = logging.getLogger(__name__)

# On Ctrl-C / SIGTERM, requests in flight get this long to finish; the rest are aborted.
GRACEFUL_SHUTDOWN_S = 10


@hydra_entry
def main(config: ChituConfig) -> None:
    logger.info("Loading model %s from %s", config.models.name, config.models.checkpoint_path())
    if int(os.environ.get("RANK", "0")) != 0:
        follow_driver(config)
        return
    metrics = ServeMetrics()
    fatal: list[Exception] = []
    server: uvicorn.Server | None = None

    def stop_serving(error: Exception) -> None:  # another rank failed: stop, and exit non-zero
        fatal.append(error)
        if server is not None:
            server.should_exit = True

    engine = AsyncEngine(functools.partial(LLMEngine, config), metrics.observe_engine, stop_serving)
    engine.start()
    app = create_app(engine, config, metrics)
    server = uvicorn.Server(uvicorn.Config(app, host=config.serve.host, port=config.serve.port, log_config=None,
                                           timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S))
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then raises the signal again under the handler
    # it found at start; with these, that second delivery does nothing and the process exits with 0.
    for handled in (signal.SIGINT, signal.SIGTERM):
        signal.signal(handled, lambda signum, frame: None)
    server.run()
    if fatal:
        raise SystemExit(f"Chitu service stopped: {fatal[0]}")
    logger.info("Chitu service stopped")


def follow_driver(config: ChituConfig) -> None:
    """Ranks other than 0 compute rank 0's steps until it shuts down."""
    LLMEngine(config).follow_driver()
