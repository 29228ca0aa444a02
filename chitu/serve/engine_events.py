"""What crosses between the engine loop (engine_core.py) and the server's front end (async_engine.py): commands
in, each turn's events out; plain data, pickled when the engine has a process of its own. Light to import: the
server starts the engine process before it imports the rest of itself."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Union

from chitu.engine.request import TokenLogprob
from chitu.engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int = 0


@dataclass(frozen=True)
class Abort:
    request_id: str


Command = Union[Add, Abort, None]  # None: stop
STOP: Command = None


@dataclass(frozen=True)
class Ready:
    """The engine is built (the first event)."""

    max_model_tokens: int
    vocab_size: int


@dataclass(frozen=True)
class Settled:
    """An Add was admitted (error None) or rejected (RequestRejected, ValueError, …)."""

    request_id: str
    error: Exception | None


@dataclass(frozen=True)
class Produced:
    """What one step added to a request: its token ids, text not yet made (the front end detokenizes)."""

    request_id: str
    token_ids: list[int]
    logprobs: list[TokenLogprob]
    finish_reason: str | None  # set on the request's last delta: "stop" or "length"
    stop_reason: str | None    # what ended the request at its last token, for the detokenizer


@dataclass(frozen=True)
class Failed:
    """The engine dropped these requests: a step that ran them failed, or the engine is stopping."""

    request_ids: list[str]
    message: str
    stopping: bool = False


@dataclass(frozen=True)
class EngineStats:
    running: int
    waiting: int
    kv_usage: float
    kv_free_blocks: int
    prefix_query_tokens: int
    prefix_hit_tokens: int


@dataclass(frozen=True)
class Fatal:
    """The engine cannot go on; `message` is for the clients, `cause` for the server's exit message."""

    message: str
    cause: str


Event = Union[Ready, Settled, Produced, Failed, EngineStats, Fatal]
Receive = Callable[[float], list[Command]]  # the commands queued, waiting up to the given seconds for one
Emit = Callable[[list[Event]], None]
