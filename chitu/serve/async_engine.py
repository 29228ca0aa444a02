"""The engine thread: it alone touches the LLMEngine; asyncio code talks to it through a queue.

The thread also builds the engine: then all torch work of the process happens on one thread,
which matters on CPUs, where a second thread running ops gets an OpenMP pool of its own and
the two pools slow each other down (~25% per step on two cores).

Submissions and aborts are commands queued to the thread. It runs them between steps, steps while
any request is unfinished and sleeps on the queue when idle (waking now and then so the engine can
tell the other ranks it is alive). Each step's outputs reach their consumers on the event loop
through one `call_soon_threadsafe`; the loop turns their tokens into text, so detokenization is off the
engine thread's path from one step to the next. A failing step costs only the requests it ran: they get an
EngineError and are aborted, and the thread serves everyone else. Any other failure means the
engine cannot go on (another rank failed, idle or busy; a sticky CUDA error; a bug): the thread
fails every request, stops taking new ones (/health says 503) and calls `on_fatal`.

Admission is bounded on the event loop: requests that have not produced their first token count
as waiting, and past `max_waiting_requests` of them, or `max_waiting_tokens` of their prompt tokens,
`add` raises EngineOverloaded (a request alone is always admitted).
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

from chitu.distributed.comm import CommError
from chitu.engine.detokenizer import IncrementalDetokenizer, step_text
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
                 on_started: Callable[[RequestStream], None] = lambda stream: None):
        self.request_id = request_id
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


class AsyncEngine:
    def __init__(self, build: Callable[[], LLMEngine], after_step: Callable[[LLMEngine], None] = lambda engine: None,
                 on_fatal: Callable[[Exception], None] = lambda error: None, max_waiting_requests: int = 1 << 30,
                 max_waiting_tokens: int = 1 << 62):
        self.engine: LLMEngine | None = None  # set by the thread; read-only elsewhere
        self.max_waiting_requests = max_waiting_requests
        self.max_waiting_tokens = max_waiting_tokens
        self.num_waiting = 0     # event loop only: requests submitted that have not started generating
        self.waiting_tokens = 0  # and their prompt tokens
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
        stream = RequestStream(request_id, len(prompt_token_ids), self.abort, self._stop_waiting)
        self.num_waiting += 1
        self.waiting_tokens += len(prompt_token_ids)
        accepted = stream.loop.create_future()
        self._commands.put(lambda: self._add(stream, prompt_token_ids, params, priority, accepted))
        try:
            await accepted
        except BaseException:
            stream.close()  # rejected, or the submitter was cancelled
            raise
        return stream

    def _stop_waiting(self, stream: RequestStream) -> None:
        self.num_waiting -= 1
        self.waiting_tokens -= stream.num_prompt_tokens

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
            self.engine.detokenize_in_step = False  # the event loops make the text as they take the deltas
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
        except Exception as e:
            self._accepting = False
            if isinstance(e, (EngineDead, CommError)):
                logger.critical("the engine stopped: %s", e)
                error = EngineError(f"the engine stopped: {e}")
            else:
                logger.critical("the engine stopped after an unexpected error", exc_info=e)
                error = EngineError("the engine stopped after an internal error; the server log has the details")
            self._fail(list(self._streams), error)
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
        except StepError as e:
            failed = [r.request_id for r in e.requests]
            logger.error("an engine step failed; aborting request(s) %s", ", ".join(failed), exc_info=e.__cause__)
            for request_id in failed:
                self._fail([request_id], EngineError(f"the engine failed while running this request ({request_id}); "
                                                     f"the server log has the details"))
            return
        deliveries = []
        for output in outputs:
            request = output.request
            finish_reason = request.finish_reason if output.finished else None
            stream = self._streams.pop(request.request_id) if finish_reason else self._streams.get(request.request_id)
            if stream is not None:
                delta = Delta(output.new_token_ids, output.new_text, output.new_logprobs, finish_reason)
                deliveries.append((stream, delta if request.detokenizer is None else
                                   Untokenized(delta, request.detokenizer, output.stop_reason)))
        deliver(deliveries)

    def _fail(self, request_ids: list[str], error: EngineError) -> None:
        for request_id in request_ids:
            self.engine.abort(request_id)
        deliver([(self._streams.pop(i), error) for i in request_ids if i in self._streams])


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
