"""One error envelope for every answer that is not a success.

``{"error": {"code", "message", "param", "issues": [...]}}``: ``code`` is stable and machine-readable,
``param`` names the request field at fault when there is one, and ``issues`` are the engine's
located problems (file, line, path, message, hint) kept as they are.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from finetune.errors import FinetuneError, Issue, IssuesError, fault_of

logger = logging.getLogger(__name__)

_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
          405: "method_not_allowed", 406: "not_acceptable", 409: "conflict", 411: "length_required",
          413: "too_large", 415: "unsupported_media_type", 416: "range_not_satisfiable",
          422: "invalid_request", 429: "too_many_requests", 500: "internal_error", 503: "unavailable"}  # fmt: skip


class IssueOut(BaseModel):
    file: str | None = None
    line: int | None = None
    path: str = ""
    message: str
    hint: str | None = None


class ErrorBody(BaseModel):
    code: str
    message: str
    param: str | None = None
    issues: list[IssueOut] = []


class ErrorEnvelope(BaseModel):
    error: ErrorBody


class ApiError(Exception):
    """An answer other than success, in the envelope."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        issues: Iterable[Issue | dict[str, Any]] = (),
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers
        self.code = code or _CODES.get(status, "error")
        self.issues = [i.as_dict() if isinstance(i, Issue) else dict(i) for i in issues]

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, "param": self.param, "issues": self.issues}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def not_found(what: str, ident: str) -> ApiError:
    """The same answer for a missing resource and for another tenant's."""
    return ApiError(404, f"no {what} '{ident}'", code="not_found")


def from_engine(exc: FinetuneError, *, status: int = 422, param: str | None = None) -> ApiError:
    """An engine error as an answer: the tenant's fault is theirs to fix (422), others are ours."""
    issues = exc.issues if isinstance(exc, IssuesError) else []
    message = str(exc).split("\n", 1)[0] if issues else str(exc)
    if fault_of(exc) != "tenant":
        return ApiError(503 if fault_of(exc) == "transient" else 500, message, param=param)
    return ApiError(status, message, param=param, issues=issues)


def _location(loc: Sequence[Any]) -> tuple[str | None, str]:
    """The request part (``body``, ``query``...) and the dotted field path of a validation error."""
    parts = [str(p) for p in loc]
    where = parts[0] if parts else None
    return where, ".".join(parts[1:])


def install(app: FastAPI) -> None:
    """Route every error into the envelope."""

    @app.exception_handler(ApiError)
    async def _api(_request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        issues = []
        first: str | None = None
        for err in exc.errors():
            where, path = _location(err.get("loc", ()))
            param = path or where
            first = first or param
            issues.append({"file": None, "line": None, "path": path if where == "body" else (param or ""),
                           "message": str(err.get("msg", "invalid")), "hint": None})  # fmt: skip
        return ApiError(422, "the request is not valid", param=first, issues=issues).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else _CODES.get(exc.status_code, "error")
        return ApiError(exc.status_code, message, headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(FinetuneError)
    async def _engine(_request: Request, exc: FinetuneError) -> JSONResponse:
        if fault_of(exc) != "tenant":
            logger.exception("engine error", exc_info=exc)
        return from_engine(exc).response()

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return ApiError(500, "internal error; it has been logged").response()


#: For the OpenAPI document: the errors routes answer, each in the envelope. The app declares 400, 401,
#: 403, 404, 413 and 422 on each route from what it takes; a route declares the others it answers itself.
ERROR_RESPONSES: dict[int, dict[str, Any]] = {
    status: {"model": ErrorEnvelope, "description": text}
    for status, text in ((400, "The request body cannot be read (not UTF-8, say)"),
                         (401, "Missing, unknown or revoked API key"),
                         (403, "The key's role, or the tenant's term, does not reach this route"),
                         (404, "No such resource"), (409, "In conflict with the resource's current state"),
                         (413, "Request body too large"), (416, "Range not satisfiable"),
                         (422, "Invalid request, with located issues"), (503, "Not available now; try again"))
}  # fmt: skip


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """A route's ``responses=`` for these errors, in the envelope."""
    return {status: ERROR_RESPONSES[status] for status in statuses}
