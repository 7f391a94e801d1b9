"""Request bodies are bounded before they are read: ``Content-Length`` over the limit is answered
413 at once, and a body sent without a length is counted as it streams and cut off at the limit.
Path and query parameters hold no NUL character (:func:`no_nul`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import Request

from finetune.errors import Issue
from finetune.service.errors import ApiError

Scope = dict[str, Any]
Receive = Callable[[], Any]
Send = Callable[[dict[str, Any]], Any]


class BodyTooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: at most ``limit_for(path, method)`` bytes of request body."""

    def __init__(self, app: Any, limit_for: Callable[[str, str], int]) -> None:
        self.app, self.limit_for = app, limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"], scope["method"])
        length = None
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    await _answer(send, ApiError(400, "Content-Length is not a number"))
                    return
        if length is not None and length > limit:
            await _answer(send, _too_large(limit))
            return
        seen = 0
        started = False

        async def counted() -> dict[str, Any]:
            nonlocal seen
            message: dict[str, Any] = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge
            return message

        async def tracking_send(message: dict[str, Any]) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted, tracking_send)
        except BodyTooLarge:
            if not started:
                await _answer(send, _too_large(limit))


def _too_large(limit: int) -> ApiError:
    from finetune.files import human_size

    return ApiError(413, f"the request body is over the limit of {human_size(limit)}", code="too_large")


async def _answer(send: Send, error: ApiError) -> None:
    response = error.response()
    await send({"type": "http.response.start", "status": response.status_code,
                "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in response.headers.items()]
                + [(b"connection", b"close")]})  # fmt: skip
    await send({"type": "http.response.body", "body": response.body})


def no_nul(request: Request) -> None:
    """Refuse a NUL character in a path or query parameter (422, naming it): no id, cursor or filter
    holds one, and PostgreSQL can neither store nor compare one (it would fail the query: a 500)."""
    for name, value in (*request.path_params.items(), *request.query_params.multi_items()):
        if "\x00" in name or "\x00" in str(value):
            shown = name.replace("\x00", "\\0")
            message = f"'{shown}' holds a NUL character"
            raise ApiError(422, message, param=shown, issues=[Issue(shown, message)])
