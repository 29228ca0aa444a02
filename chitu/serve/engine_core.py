"""The engine's side of the server: a loop that alone touches the LLMEngine, fed commands and reporting events.

It runs on a thread of the server's process (`EngineThread`) or as the main thread of a process of its own
(`EngineProcess`); both hand it the same commands and take the same events, so the loop cannot tell them
apart. Each turn runs the queued commands, steps once if any request is unfinished (else tells the other
ranks the driver is alive, after sleeping on the commands for up to IDLE_WAKE_S) and emits the turn's events
in one call (engine_events.py): settled submissions, each request's new tokens, failed requests, and the
engine's gauges.

A failing step costs only the requests it ran (`Failed`); anything else that escapes the engine means it
cannot go on (another rank failed, a sticky CUDA error, a bug): `serve` logs it and returns the `Fatal`
event for the front end to fail everyone with.
"""
from __future__ import annotations

import logging
from typing import Callable

from chitu.distributed.comm import CommError
from chitu.engine.engine import EngineDead, LLMEngine, StepError
from chitu.serve.engine_events import (STOP, Add, Command, Emit, EngineStats, Event, Failed, Fatal, Produced, Receive,
                                       Settled)

logger = logging.getLogger(__name__)

IDLE_WAKE_S = 1.0


class EngineCore:
    """`portable(error)` is what a rejected submitter gets for `error` (an engine process sends it pickled)."""

    def __init__(self, engine: LLMEngine, emit: Emit,
                 portable: Callable[[Exception], Exception] = lambda error: error):
        self.engine = engine
        self.engine.detokenize_in_step = False  # the front end makes the text as it takes the tokens
        self._emit = emit
        self._portable = portable
        self._live: set[str] = set()  # admitted, not yet finished or aborted
        self._events: list[Event] = []

    def serve(self, receive: Receive) -> Fatal | None:
        """Run commands and steps until a STOP command (None) or an error the engine cannot survive (its
        Fatal event, also emitted)."""
        try:
            while self._run(receive(0.0 if self.engine.has_unfinished() else IDLE_WAKE_S)):
                if self.engine.has_unfinished():
                    self._step()
                else:
                    self.engine.keep_alive()
                self._flush()
            self._fail(sorted(self._live), "the server is shutting down", stopping=True)
            self._flush()
            self.engine.close()
            return None
        except Exception as e:
            if isinstance(e, (EngineDead, CommError)):
                logger.critical("the engine stopped: %s", e)
                fatal = Fatal(f"the engine stopped: {e}", str(e))
            else:
                logger.critical("the engine stopped after an unexpected error", exc_info=e)
                fatal = Fatal("the engine stopped after an internal error; the server log has the details",
                              f"{type(e).__name__}: {e}")
            self._emit([fatal])
            return fatal

    def _run(self, commands: list[Command]) -> bool:
        """Run the commands in order; False once told to stop."""
        for command in commands:
            if command is STOP:
                return False
            try:
                self._add(command) if isinstance(command, Add) else self._abort(command.request_id)
            except Exception:
                logger.exception("engine command failed")
        return True

    def _add(self, add: Add) -> None:
        try:
            self.engine.add_request(add.prompt_token_ids, add.params, add.request_id, add.priority)
        except Exception as e:  # rejected: the submitter gets the exception
            self._events.append(Settled(add.request_id, self._portable(e)))
            return
        self._live.add(add.request_id)
        self._events.append(Settled(add.request_id, None))

    def _abort(self, request_id: str) -> None:
        self._live.discard(request_id)
        self.engine.abort(request_id)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except StepError as e:
            failed = [r.request_id for r in e.requests]
            logger.error("an engine step failed; aborting request(s) %s", ", ".join(failed), exc_info=e.__cause__)
            for request_id in failed:
                self._fail([request_id], f"the engine failed while running this request ({request_id}); "
                                         f"the server log has the details")
            return
        for output in outputs:
            request_id = output.request.request_id
            if request_id not in self._live:
                continue  # aborted meanwhile
            finish_reason = output.request.finish_reason if output.finished else None
            if finish_reason:
                self._live.discard(request_id)
            self._events.append(Produced(request_id, output.new_token_ids, output.new_logprobs, finish_reason,
                                         output.stop_reason))

    def _fail(self, request_ids: list[str], message: str, stopping: bool = False) -> None:
        for request_id in request_ids:
            self.engine.abort(request_id)
            self._live.discard(request_id)
        if request_ids:
            self._events.append(Failed(request_ids, message, stopping))

    def _flush(self) -> None:
        events, self._events = self._events, []
        events.append(_stats_of(self.engine))
        self._emit(events)


def _stats_of(engine: LLMEngine) -> EngineStats:
    blocks = engine.blocks
    return EngineStats(len(engine.scheduler.running), engine.scheduler.num_waiting, blocks.usage, blocks.num_free,
                       blocks.query_tokens, blocks.hit_tokens)
