"""OpenAI-style errors: every failure answers `{"error": {"message", "type", "param", "code"}}`.

Bodies never carry tracebacks, paths or internal names: an unexpected failure is logged with the
request's id (also sent as the `X-Request-Id` header) and the body names only that id.
"""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

logger = logging.getLogger(__name__)
RETRY_AFTER_S = 1

class APIError(Exception):
    """An error to answer with `status_code` and an OpenAI error body."""

    def __init__(self, status_code: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.param = param
        self.code = code


def error_body(status_code: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    kind = "invalid_request_error" if status_code < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(status_code: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """The error answer; a 503 (overloaded, shutting down) tells the client when to retry."""
    if status_code == 503:
        headers = {"Retry-After": str(RETRY_AFTER_S), **(headers or {})}
    return JSONResponse(error_body(status_code, message, param, code), status_code=status_code, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status_code, exc.message, exc.param, exc.code)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = f"Invalid URL ({request.method} {request.url.path})"
        elif exc.status_code == 405:
            message = f"Method {request.method} is not allowed for {request.url.path}"
        else:
            message = str(exc.detail)
        return error_response(exc.status_code, message, headers=exc.headers)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        # Starlette re-raises the exception after this answer, so uvicorn logs its traceback as well.
        request_id = request_id_of(request.scope)
        logger.error("request %s failed", request_id, exc_info=exc)
        return error_response(500, f"internal server error; the server log has the details (request id {request_id})")


def request_id_of(scope: dict) -> str:
    return scope.get("state", {}).get("request_id", "-")
