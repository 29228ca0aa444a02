"""API keys: `Authorization: Bearer <key>` gives a listed key its priority in the scheduler."""
from __future__ import annotations

from fastapi import Header

from chitu.config.schema import ServeSection
from chitu.serve.errors import APIError

UNLISTED_PRIORITY = 0


class ApiKeys:
    def __init__(self, serve: ServeSection):
        self.priorities = {entry.key: entry.priority for entry in serve.api_keys}
        self.required = serve.require_api_key

    def priority(self, authorization: str | None = Header(None)) -> int:
        """A FastAPI dependency: the request's scheduling priority, or 401 when a listed key is required."""
        key = _bearer_token(authorization)
        if key in self.priorities:
            return self.priorities[key]
        if self.required:
            if key is None:
                raise APIError(401, "this server requires an API key: send the header 'Authorization: Bearer <key>'",
                               code="invalid_api_key")
            raise APIError(401, "incorrect API key provided", code="invalid_api_key")
        return UNLISTED_PRIORITY


def _bearer_token(authorization: str | None) -> str | None:
    scheme, _, token = (authorization or "").partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None
