"""The database: migrations and models agree, on SQLite and PostgreSQL; times come back as UTC."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from sqlalchemy import inspect

from finetune.service.db import current_revision, head_revision, make_engine, migrate, sessions
from finetune.service.models import Base, Term


def test_the_migrations_create_exactly_the_models(db_url: str) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    migrate(db_url)
    engine = make_engine(db_url)
    try:
        with engine.connect() as connection:
            diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
        assert diff == []
        assert set(inspect(engine).get_table_names()) == set(Base.metadata.tables) | {"alembic_version"}
        assert current_revision(engine) == head_revision(db_url)
        migrate(db_url)  # a second run changes nothing
        assert current_revision(engine) == head_revision(db_url)
    finally:
        engine.dispose()


def test_times_are_stored_in_utc_and_read_back_aware(db_url: str) -> None:
    migrate(db_url)
    engine = make_engine(db_url)
    try:
        taipei = timezone(timedelta(hours=8))
        start = datetime(2026, 10, 1, 8, 0, tzinfo=taipei)
        with sessions(engine)() as session, session.begin():
            session.add(Term(id="t", starts_at=start, ends_at=start + timedelta(days=92)))
        with sessions(engine)() as session:
            term = session.get(Term, "t")
            assert term is not None
            assert term.starts_at == start and term.starts_at.tzinfo is UTC
            assert term.starts_at.hour == 0
    finally:
        engine.dispose()
