"""API keys: `Authorization: Bearer <key>` gives a listed key its priority in the scheduler.

Keys come from `serve.api_keys`, from the file `serve.api_keys_file` (one `<key> [priority]` per
line, `#` comments) and from the environment variable CHITU_API_KEYS (`key[:priority],…`), so they
need not appear on a command line. A presented key is compared with every listed key in constant
time. With `serve.require_api_key`, the API and /metrics answer 401 without a listed key.
"""
from __future__ import annotations

import hmac
import os

from fastapi import Header

from chitu.config.schema import ApiKey, ConfigError, ServeSection
from chitu.serve.errors import APIError

UNLISTED_PRIORITY = 0
KEYS_ENVIRONMENT_VARIABLE = "CHITU_API_KEYS"


class ApiKeys:
    def __init__(self, serve: ServeSection):
        keys = [*serve.api_keys, *_keys_from_file(serve.api_keys_file), *_keys_from_environment()]
        self.keys = [(entry.key.encode(), entry.priority) for entry in keys]
        self.required = serve.require_api_key

    def priority(self, authorization: str | None = Header(None)) -> int:
        """A FastAPI dependency: the request's scheduling priority, or 401 when a listed key is required."""
        key = _bearer_token(authorization)
        priority = self._lookup(key) if key is not None else None
        if priority is not None:
            return priority
        if self.required:
            if key is None:
                raise APIError(401, "this server requires an API key: send the header 'Authorization: Bearer <key>'",
                               code="invalid_api_key")
            raise APIError(401, "incorrect API key provided", code="invalid_api_key")
        return UNLISTED_PRIORITY

    def _lookup(self, key: str) -> int | None:
        presented = key.encode()
        found = None
        for listed, priority in self.keys:  # no early exit: the time taken does not tell which key matched
            if hmac.compare_digest(listed, presented):
                found = priority
        return found


def _bearer_token(authorization: str | None) -> str | None:
    scheme, _, token = (authorization or "").partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def _keys_from_file(path: str | None) -> list[ApiKey]:
    if path is None:
        return []
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise ConfigError(f"serve.api_keys_file={path}: {e.strerror}") from None
    keys = []
    for number, line in enumerate(lines, 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) > 2 or len(fields) == 2 and not _is_integer(fields[1]):
            raise ConfigError(f"serve.api_keys_file={path}, line {number}: expected '<key> [priority]'")
        keys.append(ApiKey(fields[0], int(fields[1])) if len(fields) == 2 else ApiKey(fields[0]))
    return keys


def _keys_from_environment() -> list[ApiKey]:
    keys = []
    for entry in filter(None, (e.strip() for e in os.environ.get(KEYS_ENVIRONMENT_VARIABLE, "").split(","))):
        key, _, priority = entry.rpartition(":") if _is_integer(entry.rpartition(":")[2]) else (entry, "", "")
        keys.append(ApiKey(key, int(priority)) if priority else ApiKey(key))
    return keys


def _is_integer(text: str) -> bool:
    return text.lstrip("-").isdecimal()
