"""`python -m chitu …` / `torchrun … -m chitu …`: load the model, then serve it over HTTP until a signal.

The engine process is launched first and loads the model while this process imports its HTTP side (frontend.py):
on a few cores the two overlap by seconds of every start."""
from __future__ import annotations

import functools
import logging
import os
import socket

from chitu.config import ChituConfig, hydra_entry
from chitu.serve.auth import ApiKeys
from chitu.serve.engine_process import EngineProcess

logger = logging.getLogger(__name__)


@hydra_entry
def main(config: ChituConfig) -> None:
    logger.info("Loading model %s from %s", config.models.name, config.models.checkpoint_path())
    if int(os.environ.get("RANK", "0")) != 0:
        follow_driver(config)
        return
    keys = ApiKeys(config.serve)  # first: a missing key file or a port in use fails before loading
    listener = bind(config.serve.host, config.serve.port)
    if config.serve.engine_process:
        handle = EngineProcess(config)
        handle.launch()
    else:
        from chitu.engine.engine import LLMEngine
        from chitu.serve.engine_thread import EngineThread
        handle = EngineThread(functools.partial(LLMEngine, config))
    from chitu.serve.frontend import serve  # imported while the engine process loads the model

    serve(config, handle, keys, listener)


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
    from chitu.engine.engine import LLMEngine

    LLMEngine(config).follow_driver()
