"""Liveness and readiness, for load balancers and Kubernetes probes: no key needed, nothing told."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from finetune.service.scope import Svc

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process answers")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="The database answers and the dispatcher (if any) is alive",
            responses={503: {"description": "Not ready: `checks` says what fails"}})  # fmt: skip
def readyz(svc: Svc) -> Any:
    checks: dict[str, str] = {}
    try:
        with svc.db() as session:
            session.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:  # noqa: BLE001 - any failure means not ready
        checks["database"] = f"failing: {type(exc).__name__}"
    if svc.settings.dispatcher:
        alive = svc.dispatcher is not None and svc.dispatcher.alive()
        checks["dispatcher"] = "ok" if alive else "not running"
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse(
        {"status": "ready" if ready else "not ready", "checks": checks}, status_code=200 if ready else 503
    )
