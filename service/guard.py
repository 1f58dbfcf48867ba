"""What every request passes: the body-size limit (413), the token check (401, 403), the per-token rate limit
(429), and the request metrics.
"""

from __future__ import annotations

import json
import math
import time

from fastapi import HTTPException, Request
from pydantic import ValidationError

from flywheel.params import RateLimit
from service.auth import Principal
from service.schemas import Problem, ValidationErrors

ERRORS = {
    401: {"model": Problem},
    403: {"model": Problem},
    413: {"model": Problem},
    422: {"model": ValidationErrors},
    429: {"model": Problem},
    503: {"model": Problem},
}


class Invalid(Exception):
    """Field-level problems, answered as 422 ``{"detail": [{"loc", "msg", "type"}]}`` (no input echoed)."""

    def __init__(self, errors: list[dict]):
        self.errors = errors


def safe_error(error: dict, prefix: tuple = ()) -> dict:
    """One validation error as ``{"loc", "msg", "type"}`` that never carries the input: no ``input`` or ``ctx``,
    and a message that would quote the value (an unknown union tag, a parser's own text) replaced by one that
    does not."""
    msg, kind, value = error["msg"].removeprefix("Value error, "), error["type"], error.get("input")
    if kind == "union_tag_invalid":
        tags = (error.get("ctx") or {}).get("expected_tags", "")
        msg = f"unknown {(error.get('ctx') or {}).get('discriminator', 'tag')}; expected one of: {tags}"
    elif kind not in ("literal_error", "enum") and isinstance(value, str) and len(value) >= 3 and value in msg:
        msg = "invalid value"  # those two list the allowed values, which a near-miss input may spell
    return {"loc": [*prefix, *error["loc"]], "msg": msg, "type": kind}


def invalid_from(exc: ValidationError, prefix: tuple = ("body",)) -> Invalid:
    return Invalid([safe_error(e, prefix) for e in exc.errors(include_url=False)])


def too_many(limit: RateLimit, wait: float, unit: str = "requests") -> HTTPException:
    """The 429 of a token past its bucket, with ``Retry-After`` (whole seconds, at least 1)."""
    return HTTPException(
        429,
        f"rate limit of {limit.per_s:g} {unit}/s (burst {limit.burst}) exceeded",
        headers={"Retry-After": str(max(1, math.ceil(wait)))},
    )


class BodyLimitAndMetrics:
    """Pure ASGI middleware: refuses a body over its route's limit before reading it (by Content-Length) or as
    soon as it passes the limit (chunked), and records each request's status and latency by route."""

    def __init__(self, app, limits: dict[str, int], default_limit: int, metrics):
        self.app, self.limits, self.default_limit, self.metrics = app, limits, default_limit, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limits.get(scope["path"], self.default_limit)
        t0 = time.perf_counter()
        status = [500]

        async def send_recording(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
            if declared is not None and (not declared.isdigit() or int(declared) > limit):
                body = json.dumps({"detail": f"request body over the limit of {limit} bytes"}).encode()
                await send_recording(
                    {
                        "type": "http.response.start",
                        "status": 413,
                        "headers": [
                            (b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                        ],
                    }
                )
                await send_recording({"type": "http.response.body", "body": body})
                return
            seen = 0

            async def receive_limited():
                nonlocal seen
                message = await receive()
                if message["type"] == "http.request":
                    seen += len(message.get("body", b""))
                    if seen > limit:
                        raise HTTPException(413, f"request body over the limit of {limit} bytes")
                return message

            await self.app(scope, receive_limited, send_recording)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", "other")
            self.metrics.inc("flywheel_requests_total", route=path, method=scope["method"], code=str(status[0]))
            self.metrics.observe("flywheel_request_duration_seconds", time.perf_counter() - t0, route=path)


def require(scope: str):
    """A dependency: the request's bearer token must be valid (401) and allow ``scope`` (403), and the token
    must be within its rate limit for ``scope`` (429)."""

    async def check(request: Request) -> Principal:
        svc = request.app.state.svc
        header = request.headers.get("authorization", "")
        kind, _, token = header.partition(" ")
        principal = await svc.tokens.lookup(token.strip()) if kind.lower() == "bearer" else None
        if principal is None:
            raise HTTPException(
                401,
                "a valid API token is required (Authorization: Bearer <token>)",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if not principal.allows(scope):
            raise HTTPException(403, f"this token's scopes are {principal.scope!r}; {scope!r} is needed")
        limit = {"chat": svc.params.chat_rate, "feedback": svc.params.feedback_rate}.get(scope)
        if limit is not None:
            # feedback is counted per event: a request costs one here, a batch its other events once parsed
            wait = svc.limiter.take(principal.token_id, scope, limit)
            if wait > 0:
                raise too_many(limit, wait, "events" if scope == "feedback" else "requests")
        return principal

    return check
