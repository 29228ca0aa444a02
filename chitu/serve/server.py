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
    rank = int(os.environ.get("RANK", "0"))
    if rank != 0:
        logger.info("rank %d: only rank 0 serves (tensor/pipeline parallelism is not built yet); exiting", rank)
        return
    logger.info("Loading model %s from %s", config.models.name, config.models.checkpoint_path())
    metrics = ServeMetrics()
    engine = AsyncEngine(functools.partial(LLMEngine, config), metrics.observe_engine)
    engine.start()
    app = create_app(engine, config, metrics)
    server = uvicorn.Server(uvicorn.Config(app, host=config.serve.host, port=config.serve.port, log_config=None,
                                           timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S))
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then raises the signal again under the handler
    # it found at start; with these, that second delivery does nothing and the process exits with 0.
    for handled in (signal.SIGINT, signal.SIGTERM):
        signal.signal(handled, lambda signum, frame: None)
    server.run()
    logger.info("Chitu service stopped")
