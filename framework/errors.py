"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}`` on every error path."""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

log = logging.getLogger("patchbay.errors")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "timeout_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


class StartupError(RuntimeError):
    """Start-up cannot go on (bad plugin set, duplicate registration, bad flag, a model that breaks the contract)."""


class APIError(Exception):
    """An error the client sees, with its HTTP status and OpenAI envelope fields."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        #: response headers (e.g. ``Retry-After`` of a 429)
        self.headers = headers
        self.message = message
        self.status = status
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | int | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def status_error(status: int, message: str | None = None, *, param: str | None = None, code: str | None = None) -> APIError:
    if message is None:
        message = HTTPStatus(status).phrase
    return APIError(message, status=status, param=param, code=code)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(message, status=400, param=param, code=code)
