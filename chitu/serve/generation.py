"""From a submitted request to its HTTP response: stop strings, usage, SSE or one JSON body.

Whatever ends the response (the output finished, a stop string, an engine error, the client
going away) closes the request's stream, which aborts it in the engine if it is still running.
"""
from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from chitu.engine.request import TokenLogprob
from chitu.serve.async_engine import EngineError, EngineStopped, RequestStream
from chitu.serve.errors import error_body, error_response
from chitu.serve.formats import ResponseFormat
from chitu.serve.metrics import ServeMetrics
from chitu.serve.stop_strings import StopStrings

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
CLIENT_CLOSED_REQUEST = 499  # nobody reads it: the client has gone


@dataclass
class Piece:
    text: str
    logprobs: list[TokenLogprob]
    finish_reason: str | None


async def respond(http_request: Request, stream: RequestStream, fmt: ResponseFormat, stop: list[str],
                  streaming: bool, metrics: ServeMetrics) -> Response:
    run = Generation(stream, fmt, StopStrings(stop), metrics)
    if streaming:
        return StreamingResponse(run.events(), media_type="text/event-stream", headers=SSE_HEADERS)
    return await _until_disconnected(http_request, run.whole())


class Generation:
    def __init__(self, stream: RequestStream, fmt: ResponseFormat, stop: StopStrings, metrics: ServeMetrics):
        self.stream = stream
        self.fmt = fmt
        self.stop = stop
        self.metrics = metrics
        self.finish_reason = "abort"  # until the output ends otherwise

    async def pieces(self) -> AsyncIterator[Piece]:
        """The output, cut before the first stop string; the last piece has a finish_reason."""
        async for delta in self.stream:
            text, stopped = self.stop.feed(delta.text)
            finish_reason = "stop" if stopped else delta.finish_reason
            if finish_reason and not stopped:
                text += self.stop.flush()
            if finish_reason:
                self.finish_reason = finish_reason
            yield Piece(text, delta.logprobs, finish_reason)
            if finish_reason:
                return

    async def events(self) -> AsyncIterator[str]:
        """Server-sent events as OpenAI sends them, ending with `data: [DONE]`."""
        try:
            for chunk in self.fmt.first_chunks():
                yield _event(chunk)
            async for piece in self.pieces():
                if piece.text or piece.logprobs:
                    yield _event(self.fmt.piece_chunk(piece.text, piece.logprobs))
                if piece.finish_reason:
                    yield _event(self.fmt.finish_chunk(piece.finish_reason))
            if self.fmt.include_usage:
                yield _event(self.fmt.usage_chunk(self.usage()))
        except EngineError as e:
            self.finish_reason = "error"
            yield _event(error_body(_status(e), str(e)))
        finally:
            self.close()
        yield "data: [DONE]\n\n"

    async def whole(self) -> Response:
        """The whole response as one JSON body."""
        texts: list[str] = []
        logprobs: list[TokenLogprob] = []
        try:
            async for piece in self.pieces():
                texts.append(piece.text)
                logprobs.extend(piece.logprobs)
        except EngineError as e:
            self.finish_reason = "error"
            return error_response(_status(e), str(e))
        finally:
            self.close()
        return JSONResponse(self.fmt.response("".join(texts), logprobs, self.finish_reason, self.usage()))

    def usage(self) -> dict:
        prompt, completion = self.stream.num_prompt_tokens, self.stream.num_output_tokens
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def close(self) -> None:
        self.stream.close()
        self.metrics.observe_request(self.stream, self.finish_reason)


async def _until_disconnected(http_request: Request, work: Awaitable[Response]) -> Response:
    """Await `work`, but cancel it (which aborts the request) as soon as the client disconnects."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(http_request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        task.cancel()
    return task.result() if task.done() and not task.cancelled() else Response(status_code=CLIENT_CLOSED_REQUEST)


async def _disconnected(http_request: Request) -> None:
    while (await http_request.receive())["type"] != "http.disconnect":
        pass


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _status(error: EngineError) -> int:
    return 503 if isinstance(error, EngineStopped) else 500
