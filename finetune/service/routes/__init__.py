"""The routes, one module per resource; :func:`register` mounts them all."""

from __future__ import annotations

from fastapi import FastAPI


def register(app: FastAPI) -> None:
    from finetune.service.routes import admin, catalog, datasets, events, health, jobs, ops

    for module in (health, catalog, datasets, jobs, events, ops, admin):
        app.include_router(module.router)
