"""What every HTTP request goes through before a route sees it: a request id, a bounded body and a
bounded number of API requests in progress.

A body over `serve.max_body_bytes` gets 413 before it is read in full (its declared length is
checked first); the rest of it is read and dropped, so that the client, still sending, sees the
answer rather than a reset. Past `serve.max_connections` API requests in progress a new one gets
503 with Retry-After at once; /health and /metrics are never refused.
"""
from __future__ import annotations

import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chitu.serve.errors import error_response

GUARDED_PREFIX = "/v1/"
# A body larger than this is not read to its end: the connection is closed instead.
MAX_DRAIN_BYTES = 1 << 30


class BodyTooLarge(Exception):
    pass


class HTTPGuards:
    def __init__(self, app: ASGIApp, max_body_bytes: int, max_in_progress: int):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_in_progress = max_in_progress
        self.in_progress = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        send = _with_request_id(send, request_id)
        if not scope["path"].startswith(GUARDED_PREFIX):
            return await self.app(scope, receive, send)
        if self.in_progress >= self.max_in_progress:
            return await error_response(503, f"the server has {self.in_progress} requests in progress, its limit "
                                             f"(serve.max_connections): retry later")(scope, receive, send)
        self.in_progress += 1
        try:
            await self._bounded(scope, receive, send)
        finally:
            self.in_progress -= 1

    async def _bounded(self, scope: Scope, receive: Receive, send: Send) -> None:
        declared = _content_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            return await self._refuse(declared, scope, receive, send)
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise BodyTooLarge
            return message

        try:
            await self.app(scope, counting_receive, send)
        except BodyTooLarge:
            await self._refuse(received, scope, receive, send)

    async def _refuse(self, size: int, scope: Scope, receive: Receive, send: Send) -> None:
        drained = 0
        more = True
        while more and drained < MAX_DRAIN_BYTES:
            message = await receive()
            drained += len(message.get("body", b""))
            more = message["type"] == "http.request" and message.get("more_body", False)
        response = error_response(413, f"the request body has {size} bytes or more, over the limit of "
                                       f"{self.max_body_bytes} (serve.max_body_bytes)", code="request_too_large")
        await response(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None


def _with_request_id(send: Send, request_id: str) -> Send:
    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
        await send(message)
    return sending
