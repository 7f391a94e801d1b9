"""The service's FastAPI application: settings checked, database migrated, routes, dispatcher."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI
from fastapi.routing import APIRoute

import finetune
from finetune.registry import Registry
from finetune.service import errors
from finetune.service.config import ServiceConfigError, ServiceSettings
from finetune.service.db import current_revision, head_revision, make_engine, migrate, sessions
from finetune.service.limits import BodyLimit, no_nul
from finetune.service.scope import Service
from finetune.settings import Settings

logger = logging.getLogger(__name__)

UPLOAD_PATH = "/v1/datasets/upload"

DESCRIPTION = """The job service of the fine-tuning engine: tenants upload datasets and submit recipes,
watch their jobs' progress and download model archives; operators see queues, usage, health and
throughput of every tenant, never a tenant's content.

Authenticate with `Authorization: Bearer <key>`. Errors share one envelope:
`{"error": {"code", "message", "param", "issues": [{"file", "line", "path", "message", "hint"}]}}`.
Lists are paginated with a cursor: pass the last id seen as `after`; `has_more` says whether to go on.
"""


def build_service(settings: ServiceSettings, engine: Settings) -> Service:
    """Check the settings, bring the database to the current schema and open it.

    Raises:
        ServiceConfigError: production mode lacks a setting, or its database is not migrated.
    """
    settings.check(engine)
    url = settings.database(engine)
    if settings.mode == "embedded":
        migrate(url)
    db = make_engine(url)
    if settings.mode == "production" and current_revision(db) != head_revision(url):
        raise ServiceConfigError("the database is not at the current schema: run 'finetune admin migrate' first")
    registry = Registry.load(engine.registry, engine.lock_path)
    return Service(settings, engine, sessions(db), registry)


def create_app(
    settings: ServiceSettings | None = None, engine: Settings | None = None, *, service: Service | None = None
) -> FastAPI:
    settings = settings or ServiceSettings()
    engine = engine or Settings()
    svc = service or build_service(settings, engine)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if svc.settings.dispatcher and svc.dispatcher is None:
            from finetune.service.dispatcher import Dispatcher

            svc.dispatcher = Dispatcher(svc)
            svc.dispatcher.start()
        try:
            yield
        finally:
            if svc.dispatcher is not None:
                svc.dispatcher.stop()
                svc.dispatcher = None

    app = FastAPI(
        title="finetune job service",
        version=finetune.__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        responses=errors.error_responses(422),  # in place of FastAPI's own; _declare_errors keeps it where due
        generate_unique_id_function=_operation_id,
        dependencies=[Depends(no_nul)],
    )
    app.state.service = svc
    errors.install(app)
    from finetune.service.routes import register

    register(app)
    plain_openapi = app.openapi
    app.openapi = lambda: _declare_errors(plain_openapi())  # type: ignore[method-assign]

    def limit_for(path: str, method: str) -> int:
        return settings.max_upload_bytes if path == UPLOAD_PATH else settings.max_body_bytes

    app.add_middleware(BodyLimit, limit_for=limit_for)
    return app


def _operation_id(route: APIRoute) -> str:
    """The handler's name: stable and readable in generated clients (tests keep the names unique)."""
    return route.name


def _declare_errors(doc: dict[str, Any]) -> dict[str, Any]:
    """Declare each operation's errors, in the envelope, from what it takes: a body (400, 413), a key
    (401), a role (403: its security names one), a path id (404), any input (422). A route's own stay."""
    for operation in (op for item in doc["paths"].values() for op in item.values()):
        responses, params, body = operation["responses"], operation.get("parameters", []), "requestBody" in operation
        roles = [scopes for requirement in operation.get("security", []) for scopes in requirement.values()]
        invalid = responses.pop("422", None)
        wanted = {400: body, 401: bool(roles), 403: any(roles), 404: any(p["in"] == "path" for p in params),
                  413: body, 422: body or bool(params)}  # fmt: skip
        for status in (status for status, needed in wanted.items() if needed):
            responses.setdefault(str(status), (invalid if status == 422 else None) or _envelope(status))
    return doc


def _envelope(status: int) -> dict[str, Any]:
    schema = {"$ref": f"#/components/schemas/{errors.ErrorEnvelope.__name__}"}
    return {"description": errors.ERROR_RESPONSES[status]["description"],
            "content": {"application/json": {"schema": schema}}}  # fmt: skip
