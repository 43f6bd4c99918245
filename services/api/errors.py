"""One place that turns failures into HTTP answers, so handlers carry no try/except.

Every error leaves as JSON ``{"error": "..."}`` with the status that fits.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler
from orchestrix.db import pool as db_pool

log = logging.getLogger("api")


class ApiError(Exception):
    """A request the API refuses, with the status and the message to send."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


def json_response(
    data: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(data), status=status, content_type="application/json", headers=headers
    )


def error_response(
    status: int, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    return json_response({"error": message}, status=status, headers=headers)


def _http_message(exc: web.HTTPException, request: web.Request) -> str:
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return f"request body is larger than the limit of {request.app[MAX_BODY]} bytes"
    if isinstance(exc, web.HTTPMethodNotAllowed):
        return (
            f"method {exc.method} is not allowed here; use {', '.join(sorted(exc.allowed_methods))}"
        )
    if isinstance(exc, web.HTTPNotFound):
        return f"no such endpoint: {request.method} {request.path}"
    return exc.reason


MAX_BODY = web.AppKey("max_body_bytes", int)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return error_response(exc.status, exc.message, exc.headers)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return error_response(exc.status, _http_message(exc, request), headers)
    except db_pool.TRANSIENT as exc:  # nothing was written; the client may retry
        log.warning("database unavailable", extra={"error": repr(exc), "path": request.path})
        return error_response(503, "the database is unavailable; retry later", {"Retry-After": "1"})
    except Exception:
        log.exception("unhandled error", extra={"method": request.method, "path": request.path})
        return error_response(500, "internal error")
