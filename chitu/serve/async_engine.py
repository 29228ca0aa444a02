"""The engine thread: it alone touches the LLMEngine; asyncio code talks to it through a queue.

The thread also builds the engine: then all torch work of the process happens on one thread,
which matters on CPUs, where a second thread running ops gets an OpenMP pool of its own and
the two pools slow each other down (~25% per step on two cores).

Submissions and aborts are commands queued to the thread. It runs them between steps, steps while
any request is unfinished and sleeps on the queue when idle (waking now and then so the engine can
tell the other ranks it is alive). Each step's outputs reach their consumers on the event loop
through one `call_soon_threadsafe`. A failing step costs only the requests it ran: they get an
EngineError and are aborted, and the thread serves everyone else. Only when the engine itself is
dead (another rank failed) does the thread fail every request and call `on_fatal`.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

from chitu.engine.engine import EngineDead, LLMEngine, StepError
from chitu.engine.request import TokenLogprob
from chitu.engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

Command = Callable[[], None]
_STOP = None  # the command that ends the thread
IDLE_WAKE_S = 1.0


class EngineError(RuntimeError):
    """The engine could not finish a request (a failed step, a shutdown); the message is for the client."""


class EngineStopped(EngineError):
    """The server is shutting down and takes no more requests."""


@dataclass(frozen=True)
class Delta:
    """What one step added to a request."""

    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob]
    finish_reason: str | None  # set on the request's last delta: "stop" or "length"


class RequestStream:
    """One request's deltas, iterated on the event loop that submitted it."""

    def __init__(self, request_id: str, num_prompt_tokens: int, abort: Callable[[str], None]):
        self.request_id = request_id
        self.num_prompt_tokens = num_prompt_tokens
        self.num_output_tokens = 0
        self.loop = asyncio.get_running_loop()
        self.created_at = time.monotonic()
        self.first_token_at: float | None = None
        self.done = False  # finished by the engine, failed, or closed by its consumer
        self._queue: asyncio.Queue[Delta | EngineError] = asyncio.Queue()
        self._abort = abort

    def put(self, item: Delta | EngineError) -> None:
        """Called on the stream's event loop (see `deliver`)."""
        self._queue.put_nowait(item)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> Delta:
        if self.done:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, EngineError):
            self.done = True
            raise item
        self.num_output_tokens += len(item.token_ids)
        if self.first_token_at is None and item.token_ids:
            self.first_token_at = time.monotonic()
        self.done = item.finish_reason is not None
        return item

    def close(self) -> None:
        """Stop the request if the engine has not finished it: its KV blocks are freed at once."""
        if not self.done:
            self.done = True
            self._abort(self.request_id)


class AsyncEngine:
    def __init__(self, build: Callable[[], LLMEngine], after_step: Callable[[LLMEngine], None] = lambda engine: None,
                 on_fatal: Callable[[Exception], None] = lambda error: None):
        self.engine: LLMEngine | None = None  # set by the thread; read-only elsewhere
        self._build = build
        self._on_fatal = on_fatal  # runs on the engine thread when the engine cannot go on
        self._build_error: Exception | None = None
        self._ready = threading.Event()
        self._after_step = after_step  # runs on the engine thread, e.g. to update gauges
        self._commands: queue.SimpleQueue[Command | None] = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}  # engine thread only
        self._thread = threading.Thread(target=self._run, name="chitu-engine", daemon=True)
        self._accepting = True

    def start(self) -> None:
        """Start the thread and wait until it has built the engine; a failed build is raised here."""
        self._thread.start()
        self._ready.wait()
        if self._build_error is not None:
            raise self._build_error

    @property
    def max_model_tokens(self) -> int:
        return self.engine.max_model_tokens

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive() and self._accepting

    async def add(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                  priority: int = 0) -> RequestStream:
        """Submit a request; raises what LLMEngine.add_request raises (RequestRejected, ValueError)."""
        if not self.is_alive:
            raise EngineStopped("the engine is not running (the server is shutting down)")
        stream = RequestStream(request_id, len(prompt_token_ids), self.abort)
        accepted = stream.loop.create_future()
        self._commands.put(lambda: self._add(stream, prompt_token_ids, params, priority, accepted))
        try:
            await accepted
        except asyncio.CancelledError:
            self.abort(request_id)
            raise
        return stream

    def abort(self, request_id: str) -> None:
        self._commands.put(lambda: self._abort(request_id))

    def stop(self) -> None:
        """Take no more requests, abort those in flight (their consumers get EngineStopped), join the thread."""
        self._accepting = False
        self._commands.put(_STOP)
        self._thread.join()

    # Everything below runs on the engine thread.

    def _run(self) -> None:
        try:
            self.engine = self._build()
        except Exception as e:
            self._build_error = e
            return
        finally:
            self._ready.set()
        try:
            while self._run_commands(block=not self.engine.has_unfinished()):
                if self.engine.has_unfinished():
                    self._step()
                else:
                    self.engine.keep_alive()
                self._after_step(self.engine)
            self._fail(list(self._streams), EngineStopped("the server is shutting down"))
            self._after_step(self.engine)
            self.engine.close()
        except EngineDead as e:
            logger.critical("the engine stopped: %s", e)
            self._accepting = False
            self._fail(list(self._streams), EngineError(f"the engine stopped: {e}"))
            self._on_fatal(e)

    def _run_commands(self, block: bool) -> bool:
        """Run the queued commands, first waiting for one if `block`; False once told to stop."""
        try:
            command = self._commands.get(block=block, timeout=IDLE_WAKE_S if block else None)
            while command is not _STOP:
                try:
                    command()
                except Exception:
                    logger.exception("engine command failed")
                command = self._commands.get_nowait()
            return False
        except queue.Empty:
            return True

    def _add(self, stream: RequestStream, prompt: list[int], params: SamplingParams, priority: int,
             accepted: asyncio.Future) -> None:
        try:
            self.engine.add_request(prompt, params, stream.request_id, priority)
        except Exception as e:  # rejected: the submitter gets the exception
            stream.loop.call_soon_threadsafe(_settle, accepted, e)
            return
        self._streams[stream.request_id] = stream
        stream.loop.call_soon_threadsafe(_settle, accepted, None)

    def _abort(self, request_id: str) -> None:
        self._streams.pop(request_id, None)
        self.engine.abort(request_id)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except EngineDead:
            raise
        except Exception as e:
            failed = [r.request_id for r in e.requests] if isinstance(e, StepError) else list(self._streams)
            logger.exception("engine step failed; aborting %d request(s)", len(failed))
            self._fail(failed, EngineError(f"the engine failed while running this request: {e.__cause__ or e}"))
            return
        deliveries = []
        for output in outputs:
            request = output.request
            finish_reason = request.finish_reason if output.finished else None
            stream = self._streams.pop(request.request_id) if finish_reason else self._streams.get(request.request_id)
            if stream is not None:
                deliveries.append((stream, Delta(output.new_token_ids, output.new_text, output.new_logprobs,
                                                 finish_reason)))
        deliver(deliveries)

    def _fail(self, request_ids: list[str], error: EngineError) -> None:
        for request_id in request_ids:
            self.engine.abort(request_id)
        deliver([(self._streams.pop(i), error) for i in request_ids if i in self._streams])


def deliver(items: list[tuple[RequestStream, Delta | EngineError]]) -> None:
    """Hand items to their streams with one wake-up per event loop, not one per stream."""
    by_loop: dict[asyncio.AbstractEventLoop, list] = defaultdict(list)
    for stream, item in items:
        by_loop[stream.loop].append((stream, item))
    for loop, batch in by_loop.items():
        loop.call_soon_threadsafe(_put_all, batch)


def _put_all(batch: list[tuple[RequestStream, Delta | EngineError]]) -> None:
    for stream, item in batch:
        stream.put(item)


def _settle(future: asyncio.Future, error: Exception | None) -> None:
    if future.done():  # the submitter was cancelled meanwhile
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
