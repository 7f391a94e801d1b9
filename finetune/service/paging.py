"""Cursor pagination: newest first by id (ids sort by creation time), ``after`` the last id seen."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Annotated, Any, TypeVar

from fastapi import Query
from sqlalchemy import Select
from sqlalchemy.orm import Session

from finetune.service.schemas import Page

T = TypeVar("T")
MAX_LIMIT = 100

After = Annotated[str | None, Query(max_length=64, description="The last id of the previous page.")]
Limit = Annotated[int, Query(ge=1, le=MAX_LIMIT, description="Items per page.")]


def page(session: Session, query: Select[Any], id_column: Any, after: str | None, limit: int,
         render: Callable[[Any], T]) -> Page[T]:  # fmt: skip
    if after is not None:
        query = query.where(id_column < after)
    rows: Sequence[Any] = session.scalars(query.order_by(id_column.desc()).limit(limit + 1)).all()
    more = len(rows) > limit
    rows = rows[:limit]
    return Page[T](data=[render(r) for r in rows], has_more=more, next_after=rows[-1].id if more and rows else None)
