"""The server's handle on the engine: requests in, streams of deltas out, on asyncio event loops.

The engine loop (engine_core.py) runs in a process of its own (engine_process.py) or on a thread of this one
(engine_thread.py); this side sends it Add / Abort / STOP commands and takes its events on a thread of this
process, which hands each turn's deltas to their streams with one `call_soon_threadsafe` per event loop. The
event loop makes their text (so detokenization is off the engine's path from one step to the next). A failed
step costs only the requests it ran: they get an EngineError. A Fatal event (another rank failed, a sticky
CUDA error, a bug, the engine process gone) fails every request, stops taking new ones (/health says 503) and
calls `on_fatal`.

Admission is bounded on the event loop: requests that have not produced their first token count
as waiting, and past `max_waiting_requests` of them, or `max_waiting_tokens` of their prompt tokens,
`add` raises EngineOverloaded (a request alone is always admitted).
"""
from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Protocol

from chitu.engine.detokenizer import IncrementalDetokenizer, step_text
from chitu.engine.request import TokenLogprob
from chitu.engine.sampling_params import SamplingParams
from chitu.serve.engine_events import (STOP, Abort, Add, Command, Emit, EngineStats, Event, Failed, Fatal, Produced,
                                       Ready, Settled)
from chitu.tokenizer import Tokenizer


class EngineError(RuntimeError):
    """The engine could not finish a request (a failed step, a shutdown); the message is for the client."""


class EngineStopped(EngineError):
    """The server is shutting down and takes no more requests."""


class EngineOverloaded(EngineError):
    """Too many requests are waiting: retry later."""


@dataclass(frozen=True)
class Delta:
    """What one step added to a request."""

    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob]
    finish_reason: str | None  # set on the request's last delta: "stop" or "length"


class RequestStream:
    """One request's deltas, iterated on the event loop that submitted it."""

    def __init__(self, request_id: str, num_prompt_tokens: int, abort: Callable[[str], None],
                 on_started: Callable[[RequestStream], None] = lambda stream: None,
                 detokenizer: IncrementalDetokenizer | None = None):
        self.request_id = request_id
        self.detokenizer = detokenizer  # None (no tokenizer): deltas carry no text
        self.num_prompt_tokens = num_prompt_tokens
        self.num_output_tokens = 0
        self.loop = asyncio.get_running_loop()
        self.created_at = time.monotonic()
        self.first_token_at: float | None = None
        self.done = False  # finished by the engine, failed, or closed by its consumer
        self._queue: asyncio.Queue[Delta | EngineError] = asyncio.Queue()
        self._held: EngineError | None = None  # an error queued behind deltas merged into one (see _merged)
        self._abort = abort
        self._on_started = on_started  # called once: at the first token, or when the stream ends without one
        self.accepted = self.loop.create_future()  # settled when the engine admits or rejects the request

    def put(self, item: Delta | EngineError) -> None:
        """Called on the stream's event loop (see `deliver`)."""
        self._queue.put_nowait(item)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> Delta:
        if self.done:
            raise StopAsyncIteration
        item, self._held = self._held or await self._queue.get(), None
        if isinstance(item, EngineError):
            self.done = True
            self._started()
            raise item
        item = self._merged(item)
        self.num_output_tokens += len(item.token_ids)
        if self.first_token_at is None and item.token_ids:
            self.first_token_at = time.monotonic()
            self._started()
        self.done = item.finish_reason is not None
        return item

    def _merged(self, delta: Delta) -> Delta:
        """`delta` and the deltas queued behind it, as one: a consumer that falls behind its request (a slow
        client, a loop busy with many streams) sends one event for several steps instead of catching up by one."""
        while delta.finish_reason is None and not self._queue.empty():
            following = self._queue.get_nowait()
            if isinstance(following, EngineError):
                self._held = following
                break
            delta = Delta(delta.token_ids + following.token_ids, delta.text + following.text,
                          delta.logprobs + following.logprobs, following.finish_reason)
        return delta

    def close(self) -> None:
        """Stop the request if the engine has not finished it: its KV blocks are freed at once."""
        self._started()
        if not self.done:
            self.done = True
            self._abort(self.request_id)

    def _started(self) -> None:
        on_started, self._on_started = self._on_started, lambda stream: None
        on_started(self)


class EngineHandle(Protocol):
    """Where the engine loop runs: EngineProcess or EngineThread."""

    tokenizer: Tokenizer | None
    is_alive: bool

    def start(self, emit: Emit) -> Ready: ...

    def send(self, command: Command) -> None: ...

    def join(self) -> None: ...


class AsyncEngine:
    def __init__(self, handle: EngineHandle, on_stats: Callable[[EngineStats], None] = lambda stats: None,
                 on_fatal: Callable[[Exception], None] = lambda error: None, max_waiting_requests: int = 1 << 30,
                 max_waiting_tokens: int = 1 << 62):
        self.handle = handle
        self.tokenizer: Tokenizer | None = None
        self.max_model_tokens = 0
        self.vocab_size = 0
        self.max_waiting_requests = max_waiting_requests
        self.max_waiting_tokens = max_waiting_tokens
        self.num_waiting = 0     # event loop only: requests submitted that have not started generating
        self.waiting_tokens = 0  # and their prompt tokens
        self._on_stats = on_stats  # runs on the thread that takes the engine's events, e.g. to update gauges
        self._on_fatal = on_fatal  # and this, when the engine cannot go on
        self._streams: dict[str, RequestStream] = {}  # submitted, not yet finished, failed or closed
        self._accepting = True

    def start(self) -> None:
        """Start the engine and wait until it is built; a failed build is raised here."""
        ready = self.handle.start(self._take)
        self.tokenizer = self.handle.tokenizer
        self.max_model_tokens, self.vocab_size = ready.max_model_tokens, ready.vocab_size

    @property
    def is_alive(self) -> bool:
        return self._accepting and self.handle.is_alive

    def check_capacity(self, num_prompt_tokens: int = 0) -> None:
        """Raise EngineStopped or EngineOverloaded when a request of this size cannot be taken now."""
        if not self.is_alive:
            raise EngineStopped("the engine is not running")
        if self.num_waiting >= self.max_waiting_requests:
            raise EngineOverloaded(f"{self.num_waiting} requests are waiting, the limit (serve.max_waiting_requests): "
                                   f"retry later")
        if self.num_waiting and self.waiting_tokens + num_prompt_tokens > self.max_waiting_tokens:
            raise EngineOverloaded(f"{self.waiting_tokens} prompt tokens are waiting; {num_prompt_tokens} more would "
                                   f"pass the limit of {self.max_waiting_tokens} (serve.max_waiting_tokens): retry later")

    async def add(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                  priority: int = 0) -> RequestStream:
        """Submit a request; raises EngineStopped / EngineOverloaded, or what LLMEngine.add_request raises
        (RequestRejected, ValueError)."""
        self.check_capacity(len(prompt_token_ids))
        detokenizer = IncrementalDetokenizer(self.tokenizer.hf, prompt_token_ids) if self.tokenizer else None
        stream = RequestStream(request_id, len(prompt_token_ids), self.abort, self._stop_waiting, detokenizer)
        self.num_waiting += 1
        self.waiting_tokens += len(prompt_token_ids)
        self._streams[request_id] = stream
        if not self._accepting:  # a Fatal taken since check_capacity may not have seen this stream
            stream.close()
            raise EngineStopped("the engine is not running")
        self.handle.send(Add(request_id, prompt_token_ids, params, priority))
        try:
            await stream.accepted
        except BaseException:
            stream.close()  # rejected, or the submitter was cancelled
            raise
        return stream

    def _stop_waiting(self, stream: RequestStream) -> None:
        self.num_waiting -= 1
        self.waiting_tokens -= stream.num_prompt_tokens

    def abort(self, request_id: str) -> None:
        self._streams.pop(request_id, None)
        self.handle.send(Abort(request_id))

    def stop(self) -> None:
        """Take no more requests, abort those in flight (their consumers get EngineStopped), wait for the engine
        to close."""
        self._accepting = False
        self.handle.send(STOP)
        self.handle.join()

    def _take(self, events: list[Event]) -> None:
        """One turn's events, on the thread that takes them from the engine."""
        deliveries = []
        for event in events:
            if isinstance(event, Produced):
                stream = (self._streams.pop if event.finish_reason else self._streams.get)(event.request_id, None)
                if stream is not None:
                    deliveries.append((stream, _delta(stream, event)))
            elif isinstance(event, Settled):
                stream = self._streams.get(event.request_id)
                if stream is not None:
                    stream.loop.call_soon_threadsafe(_settle, stream.accepted, event.error)
            elif isinstance(event, Failed):
                error = (EngineStopped if event.stopping else EngineError)(event.message)
                deliveries += [(self._streams.pop(i), error) for i in event.request_ids if i in self._streams]
            elif isinstance(event, EngineStats):
                self._on_stats(event)
            elif isinstance(event, Fatal):
                self._accepting = False
                error = EngineError(event.message)
                deliveries += [(self._streams.pop(i), error) for i in list(self._streams)]
                self._on_fatal(RuntimeError(event.cause))
        deliver(deliveries)


def _delta(stream: RequestStream, produced: Produced) -> Delta | Untokenized:
    delta = Delta(produced.token_ids, "", produced.logprobs, produced.finish_reason)
    return delta if stream.detokenizer is None else Untokenized(delta, stream.detokenizer, produced.stop_reason)


@dataclass(frozen=True)
class Untokenized:
    """A delta whose text its stream's event loop makes (off the engine thread; in order, being one thread)."""

    delta: Delta
    detokenizer: IncrementalDetokenizer
    stop_reason: str | None

    def with_text(self) -> Delta:
        text = "".join(step_text(self.detokenizer, token_id, self.stop_reason if i == len(self.delta.token_ids) - 1
                                 else None) for i, token_id in enumerate(self.delta.token_ids))
        return dataclasses.replace(self.delta, text=text)


def deliver(items: list[tuple[RequestStream, Delta | Untokenized | EngineError]]) -> None:
    """Hand items to their streams with one wake-up per event loop, not one per stream."""
    by_loop: dict[asyncio.AbstractEventLoop, list] = defaultdict(list)
    for stream, item in items:
        by_loop[stream.loop].append((stream, item))
    for loop, batch in by_loop.items():
        loop.call_soon_threadsafe(_put_all, batch)


def _put_all(batch: list[tuple[RequestStream, Delta | Untokenized | EngineError]]) -> None:
    for stream, item in batch:
        stream.put(item.with_text() if isinstance(item, Untokenized) else item)


def _settle(future: asyncio.Future, error: Exception | None) -> None:
    if future.done():  # the submitter was cancelled meanwhile
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
