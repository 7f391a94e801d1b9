"""``finetune serve`` and ``finetune admin``: the job service's command line.

Only parsing and printing live here; the work is done by :mod:`finetune.service.admin`,
:mod:`finetune.service.keys` and :mod:`finetune.service.app`. FastAPI, uvicorn and SQLAlchemy are
imported inside the commands, so that ``finetune validate`` does not pay for them.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any

from finetune.cli import EXIT_OK, _out, _print_json
from finetune.errors import FinetuneError, Issue, IssuesError
from finetune.settings import Settings

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from finetune.service.config import ServiceSettings
    from finetune.service.keys import NewKey

__all__ = ["DatabaseUnreachable", "SettingsError", "add_service_commands", "seed_demo"]

Command = Callable[[argparse.Namespace, Settings], int]
Subparsers = argparse._SubParsersAction  # the type argparse gives no public name

DEMO = "demo"  # the demo term's id and the demo tenant's name
DEMO_GRANT: dict[str, Any] = {"gpus_per_job": 1, "gpus_held": 2, "points": 100.0}
KEY_NAME_MAX = 100  # the api_keys.name column
GRANT_FIELDS = ("tier", "gpus_per_job", "gpus_held", "storage_bytes", "points")
NOT_MIGRATED = "the database is not at the current schema: run 'finetune admin migrate' first"


class SettingsError(IssuesError):
    """The service's settings are wrong or incomplete: the operator's to fix (exit 2)."""


class DatabaseUnreachable(FinetuneError):
    """The service's database does not answer (exit 1)."""


# ------------------------------------------------------------------------------------ settings


def _service_settings(**overrides: Any) -> ServiceSettings:
    """``FINETUNE_SERVICE_*`` settings, ``overrides`` (the command's flags) winning.

    Raises:
        SettingsError: a setting has a value it cannot take, each one named.
    """
    from pydantic import ValidationError

    from finetune.service.config import ServiceSettings

    try:
        return ServiceSettings(**overrides)
    except ValidationError as exc:
        issues = [
            Issue(path="FINETUNE_SERVICE_" + "_".join(str(part) for part in e["loc"]).upper(), message=e["msg"])
            for e in exc.errors()
        ]
        raise SettingsError(issues, "invalid service settings") from None


def _shown(url: str) -> str:
    """A database URL without its password, fit for a terminal."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def _database_url(settings: ServiceSettings, engine: Settings) -> str:
    """The database the admin commands work on; production mode never falls back to SQLite."""
    if settings.mode == "production" and not settings.database_url:
        issue = Issue(path="FINETUNE_SERVICE_DATABASE_URL", message="must be set in production mode",
                      hint="postgresql+psycopg://user@host/db")  # fmt: skip
        raise SettingsError([issue], "the database of the service is not set")
    return settings.database(engine)


@contextmanager
def _database_errors(url: str) -> Iterator[None]:
    """Turn the database's and the settings' failures into errors the CLI reports without a traceback."""
    from sqlalchemy.exc import DataError, IntegrityError, OperationalError

    from finetune.service.admin import AdminError
    from finetune.service.config import ServiceConfigError

    try:
        yield
    except ServiceConfigError as exc:
        raise SettingsError([], str(exc)) from None
    except OperationalError as exc:
        raise DatabaseUnreachable(f"the database at {_shown(url)} does not answer: {_reason(exc)}") from None
    except (DataError, IntegrityError) as exc:  # a value out of a column's range; a name taken meanwhile
        raise AdminError(f"the database refused it: {_reason(exc)}") from None


def _reason(exc: Exception) -> str:
    """The first line of a database error's own message (SQLAlchemy appends the statement)."""
    orig = getattr(exc, "orig", None)
    return (str(orig or exc).strip().splitlines() or [type(exc).__name__])[0]


@contextmanager
def _admin_session(engine: Settings) -> Iterator[Session]:
    """A session on the service's database, committed at the end of the block.

    In embedded mode the database is migrated first (the admin commands work on a fresh machine);
    in production mode it must already be at the current schema.
    """
    from finetune.service.db import current_revision, head_revision, make_engine, migrate, sessions, transaction

    settings = _service_settings()
    url = _database_url(settings, engine)
    with _database_errors(url):
        if settings.mode == "embedded":
            migrate(url)
        db = make_engine(url)
        try:
            if settings.mode == "production" and current_revision(db) != head_revision(url):
                raise SettingsError([], NOT_MIGRATED)
            with transaction(sessions(db)) as session:
                yield session
        finally:
            db.dispose()


# ------------------------------------------------------------------------------------ output


def _cell(value: Any) -> str:
    return "-" if value is None or value == "" else str(value)


def _table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    """Rows as aligned columns under a header; ``(none)`` for no rows."""
    if not rows:
        _out("(none)")
        return
    cells = [[_cell(row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(line[i]) for line in cells)) for i, c in enumerate(columns)]
    for line in [list(columns), *cells]:
        _out("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip())


def _show(args: argparse.Namespace, data: dict[str, Any] | list[dict[str, Any]], columns: Sequence[str]) -> int:
    """``data`` as JSON with ``--json``, else as a table of ``columns``."""
    if args.json:
        _print_json(data)
    else:
        _table([data] if isinstance(data, dict) else data, columns)
    return EXIT_OK


TENANT_COLUMNS = ("id", "name", "time_zone", "created_at")
TERM_COLUMNS = ("id", "starts_at", "ends_at", "closed_at")
GRANT_COLUMNS = ("tenant_id", "term_id", "tier", "gpus_per_job", "gpus_held", "storage_bytes", "points")
KEY_COLUMNS = ("id", "role", "tenant_id", "prefix", "name", "created_at", "revoked_at", "last_used_at")


# ------------------------------------------------------------------------------------ serve


def seed_demo(session: Session) -> tuple[str, NewKey]:
    """The demo tenant with a grant in the demo term (each made when absent) and a new key of its.

    Returns:
        The demo tenant's id and the new key (a new one at each call: keys are shown only once).
    """
    from sqlalchemy import select

    from finetune.service import admin
    from finetune.service.keys import create_key
    from finetune.service.models import Tenant, Term

    if session.get(Term, DEMO) is None:
        admin.create_term(session, DEMO)
    tenant = session.scalar(select(Tenant).where(Tenant.name == DEMO))
    if tenant is None:
        tenant, key = admin.create_tenant(session, DEMO)
    else:
        key = create_key(session, role="tenant", tenant_id=tenant.id, name="demo key")
    admin.grant(session, tenant.id, DEMO, **DEMO_GRANT)
    return tenant.id, key


def cmd_serve(args: argparse.Namespace, engine: Settings) -> int:
    import uvicorn

    from finetune.service.app import build_service, create_app
    from finetune.service.db import transaction

    flags = {"host": args.host, "port": args.port}
    settings = _service_settings(**{name: value for name, value in flags.items() if value is not None})
    if args.demo and settings.mode != "embedded":
        raise SettingsError([], "--demo serves embedded defaults only: unset FINETUNE_SERVICE_MODE")
    url = settings.database(engine)
    with _database_errors(url):
        svc = build_service(settings, engine)
        if args.demo:
            with transaction(svc.db) as session:
                tenant_id, key = seed_demo(session)
            _out(f"demo tenant   {tenant_id}")
            _out(f"demo API key  {key.key}")
    uvicorn.run(create_app(settings, engine, service=svc), host=settings.host, port=settings.port)
    return EXIT_OK


# ------------------------------------------------------------------------------------ admin


def cmd_admin_migrate(args: argparse.Namespace, engine: Settings) -> int:
    from finetune.service.db import head_revision, migrate

    url = _database_url(_service_settings(), engine)
    with _database_errors(url):
        migrate(url)
    _out(f"{_shown(url)}: at revision {head_revision(url)}")
    return EXIT_OK


def cmd_tenant_create(args: argparse.Namespace, engine: Settings) -> int:
    from finetune.service import admin

    with _admin_session(engine) as session:
        tenant, key = admin.create_tenant(session, args.name, time_zone=args.time_zone)
    data = {"tenant_id": tenant.id, "name": tenant.name, "time_zone": tenant.time_zone, "key_id": key.id,
            "key": key.key}  # fmt: skip
    if args.json:
        _print_json(data)
    else:
        _out(f"tenant  {tenant.id} ({tenant.name})")
        _out(f"key     {key.key}  (shown only this once)")
    return EXIT_OK


def cmd_tenant_list(args: argparse.Namespace, engine: Settings) -> int:
    from finetune.service import admin

    with _admin_session(engine) as session:
        rows = admin.list_tenants(session)
    return _show(args, rows, TENANT_COLUMNS)


def _when(text: str | None, flag: str) -> datetime | None:
    """An ISO 8601 time with its offset, or None."""
    from finetune.service.admin import AdminError

    if text is None:
        return None
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise AdminError(f"{flag}: '{text}' is not an ISO 8601 time (2026-10-01T00:00:00+08:00)") from None
    if value.tzinfo is None:
        raise AdminError(f"{flag}: give the time with its offset (2026-10-01T00:00:00+08:00 or ...Z)")
    return value


def cmd_term_create(args: argparse.Namespace, engine: Settings) -> int:
    from finetune.service import admin

    starts, ends = _when(args.starts, "--starts"), _when(args.ends, "--ends")
    with _admin_session(engine) as session:
        term = admin.create_term(session, args.id, starts_at=starts, ends_at=ends)
        data = admin.term_dict(term)
    return _show(args, data, TERM_COLUMNS)


def cmd_term_list(args: argparse.Namespace, engine: Settings) -> int:
    from finetune.service import admin

    with _admin_session(engine) as session:
        rows = admin.list_terms(session)
    return _show(args, rows, TERM_COLUMNS)


def cmd_grant_set(args: argparse.Namespace, engine: Settings) -> int:
    from sqlalchemy import select

    from finetune.service import admin
    from finetune.service.models import Grant

    given = {name: value for name in GRANT_FIELDS if (value := getattr(args, name)) is not None}
    with _admin_session(engine) as session:
        current = session.scalar(select(Grant).where(Grant.tenant_id == args.tenant_id,
                                                     Grant.term_id == args.term_id))  # fmt: skip
        kept = {} if current is None else {name: getattr(current, name) for name in GRANT_FIELDS}
        row = admin.grant(session, args.tenant_id, args.term_id, **(kept | given))
        data = admin.grant_dict(row)
    return _show(args, data, GRANT_COLUMNS)


def cmd_grant_list(args: argparse.Namespace, engine: Settings) -> int:
    from finetune.service import admin

    with _admin_session(engine) as session:
        rows = admin.list_grants(session, args.tenant)
    return _show(args, rows, GRANT_COLUMNS)


def cmd_key_create(args: argparse.Namespace, engine: Settings) -> int:
    from finetune.service.admin import AdminError
    from finetune.service.keys import create_key
    from finetune.service.models import Tenant

    if (args.role == "tenant") != (args.tenant is not None):
        raise AdminError("a tenant key needs --tenant ID; ops and admin keys belong to no tenant")
    if len(args.name) > KEY_NAME_MAX:
        raise AdminError(f"--name: at most {KEY_NAME_MAX} characters")
    with _admin_session(engine) as session:
        if args.tenant is not None and session.get(Tenant, args.tenant) is None:
            raise AdminError(f"no tenant '{args.tenant}'")
        key = create_key(session, role=args.role, tenant_id=args.tenant, name=args.name)
    if args.json:
        _print_json({"id": key.id, "key": key.key, "role": key.role, "tenant_id": key.tenant_id, "name": args.name})
    else:
        _out(f"key     {key.id} ({key.role}{f' of {key.tenant_id}' if key.tenant_id else ''})")
        _out(f"secret  {key.key}  (shown only this once)")
    return EXIT_OK


def cmd_key_list(args: argparse.Namespace, engine: Settings) -> int:
    from finetune.service import admin

    with _admin_session(engine) as session:
        rows = admin.list_keys(session, args.tenant)
    return _show(args, rows, KEY_COLUMNS)


def cmd_key_revoke(args: argparse.Namespace, engine: Settings) -> int:
    from finetune.service import admin
    from finetune.service.keys import revoke_key
    from finetune.service.models import ApiKey

    with _admin_session(engine) as session:
        if session.get(ApiKey, args.key_id) is None:
            raise admin.AdminError(f"no key '{args.key_id}'")
        revoked = revoke_key(session, args.key_id)
        row = session.get(ApiKey, args.key_id)
        assert row is not None
        data = admin.key_dict(row)
    if args.json:
        _print_json(data)
    else:
        _out(f"key {args.key_id} {'revoked' if revoked else 'was already revoked'} at {data['revoked_at']}")
    return EXIT_OK


# ------------------------------------------------------------------------------------ parser


def _port(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0 to 65535 (got {port})")
    return port


def _leaf(sub: Subparsers, name: str, help: str, func: Command, *, json: bool = True) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(name, help=help)
    if json:
        parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(func=func)
    return parser


def _group(sub: Subparsers, name: str, help: str) -> Subparsers:
    parser = sub.add_parser(name, help=help)
    return parser.add_subparsers(dest=f"{name}_command", required=True, metavar="SUBCOMMAND")


def _add_serve(sub: Subparsers) -> None:
    p = _leaf(sub, "serve", "run the job service (HTTP API and dispatcher) in this process", cmd_serve, json=False)
    p.add_argument("--host", help="address to listen on (default: FINETUNE_SERVICE_HOST, 127.0.0.1)")
    p.add_argument("--port", type=_port, help="port to listen on (default: FINETUNE_SERVICE_PORT, 8000)")
    p.add_argument("--demo", action="store_true", help="embedded defaults only: make a demo tenant, print a key")


def _add_grant(admin: Subparsers) -> None:
    grant = _group(admin, "grant", "what a tenant may use in a term")
    p = _leaf(grant, "set", "grant a tenant resources in a term, or change its grant there", cmd_grant_set)
    p.add_argument("tenant_id", metavar="TENANT_ID")
    p.add_argument("term_id", metavar="TERM_ID")
    p.add_argument("--tier", choices=["L1", "L2", "L3"], help="points tier (new grant: L1)")
    p.add_argument("--gpus-per-job", type=int, metavar="N", help="most GPUs one job may hold (new grant: 8)")
    p.add_argument("--gpus-held", type=int, metavar="N", help="most GPUs held at once over all jobs (new grant: 8)")
    p.add_argument("--storage-bytes", type=int, metavar="BYTES", help="bucket quota in the term (new grant: 10^12)")
    p.add_argument("--points", type=float, metavar="P", help="points granted, 1 point = 0.5 GPU-hour (new grant: 0)")
    p.epilog = "Options left out keep the grant's current values."
    p = _leaf(grant, "list", "every grant", cmd_grant_list)
    p.add_argument("--tenant", metavar="ID", help="one tenant's grants only")


def _add_admin(sub: Subparsers) -> None:
    admin = _group(sub, "admin", "the service's tenants, terms, grants and API keys")
    _leaf(admin, "migrate", "bring the service's database to the current schema", cmd_admin_migrate, json=False)

    tenant = _group(admin, "tenant", "tenants")
    p = _leaf(tenant, "create", "a new tenant and its first API key (shown once)", cmd_tenant_create)
    p.add_argument("name", metavar="NAME")
    p.add_argument("--time-zone", default="Asia/Taipei", help="IANA time zone of its daily usage (Asia/Taipei)")
    _leaf(tenant, "list", "every tenant", cmd_tenant_list)

    term = _group(admin, "term", "grant periods shared by every tenant")
    p = _leaf(term, "create", "a new term", cmd_term_create)
    p.add_argument("id", metavar="ID", help="lower-case letters, digits and '-' (2026-q4)")
    p.add_argument("--starts", metavar="ISO", help="start, with its offset (default: now)")
    p.add_argument("--ends", metavar="ISO", help="end, with its offset (default: 92 days after the start)")
    _leaf(term, "list", "every term", cmd_term_list)

    _add_grant(admin)

    key = _group(admin, "key", "API keys")
    p = _leaf(key, "create", "a new API key (shown once)", cmd_key_create)
    p.add_argument("--role", choices=["tenant", "ops", "admin"], required=True)
    p.add_argument("--tenant", metavar="ID", help="the tenant a tenant key belongs to")
    p.add_argument("--name", default="", help="what the key is for")
    p = _leaf(key, "list", "every key (never the key itself)", cmd_key_list)
    p.add_argument("--tenant", metavar="ID", help="one tenant's keys only")
    p = _leaf(key, "revoke", "revoke a key: it answers 401 from now on", cmd_key_revoke)
    p.add_argument("key_id", metavar="KEY_ID")


def add_service_commands(sub: Subparsers) -> None:
    """Register ``serve`` and ``admin`` on the ``finetune`` parser's subcommands."""
    _add_serve(sub)
    _add_admin(sub)
