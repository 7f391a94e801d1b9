"""Fixtures of the service tests: a database of each kind (SQLite and PostgreSQL, each test's own),
the service app on it, and tenants with keys.

PostgreSQL is the one at ``FINETUNE_TEST_POSTGRES`` (default: the local server, trust auth); every
test makes its own database and drops it afterwards. ``.ci/run`` starts the server if it is down.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

POSTGRES = os.environ.get("FINETUNE_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


def _admin_connection() -> Any:
    import psycopg

    url = POSTGRES.replace("postgresql+psycopg://", "postgresql://")
    try:
        return psycopg.connect(url, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        hint = "start it (.ci/run does) or set FINETUNE_TEST_POSTGRES"
        pytest.fail(f"PostgreSQL is not reachable at {url} ({exc}); {hint}")


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A new, empty PostgreSQL database, dropped after the test."""
    name = f"finetune_test_{secrets.token_hex(6)}"
    with _admin_connection() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = POSTGRES.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        from sqlalchemy.orm import close_all_sessions

        close_all_sessions()
        with _admin_connection() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each service test runs on both databases."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'service.db'}"
    return str(request.getfixturevalue("postgres_url"))


@dataclass
class World:
    """A running app (TestClient), its service, and who may call it."""

    client: Any
    svc: Any
    data_dir: Path
    term: str
    keys: dict[str, str] = field(default_factory=dict)  # "a", "b" (tenants), "ops", "admin"
    tenants: dict[str, str] = field(default_factory=dict)  # "a", "b" -> tenant id

    def auth(self, who: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[who]}"}

    def bucket(self, who: str) -> Any:
        from finetune.storage import Bucket

        return Bucket.for_tenant(self.svc.engine, self.tenants[who], self.term)


def make_world(db_url: str, data_dir: Path, *, engine_settings: dict[str, Any] | None = None, **service: Any) -> World:
    from fastapi.testclient import TestClient

    from finetune.service import admin
    from finetune.service.app import build_service, create_app
    from finetune.service.config import ServiceSettings
    from finetune.service.keys import create_key
    from finetune.service.models import utcnow
    from finetune.settings import Settings

    engine = Settings(data_dir=data_dir, **(engine_settings or {}))
    settings = ServiceSettings(database_url=db_url, **{"dispatcher": False, **service})
    svc = build_service(settings, engine)
    world = World(client=None, svc=svc, data_dir=data_dir, term="term-1")
    with svc.db() as session, session.begin():
        admin.create_term(session, world.term, starts_at=utcnow() - timedelta(days=1))
        for who, name in (("a", "Tenant A 甲"), ("b", "Tenant B")):
            tenant, key = admin.create_tenant(session, name)
            admin.grant(session, tenant.id, world.term, gpus_per_job=2, gpus_held=2, points=1000)
            world.tenants[who], world.keys[who] = tenant.id, key.key
        world.keys["ops"] = create_key(session, role="ops", tenant_id=None).key
        world.keys["admin"] = create_key(session, role="admin", tenant_id=None).key
    world.client = TestClient(create_app(settings, engine, service=svc), raise_server_exceptions=False)
    return world


@pytest.fixture
def world(db_url: str, tmp_path: Path) -> Iterator[World]:
    w = make_world(db_url, tmp_path / "data")
    with w.client:
        yield w
    w.svc.db.kw["bind"].dispose()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A local Ray head with its job-submission API, shared by the tests that run jobs; its address.

    Started as the service starts one on embedded defaults, in its own process group, which is
    stopped (every Ray process of it) at the end of the session.
    """
    import signal
    import subprocess
    import sys
    import time

    from finetune.service.cluster import dashboard_up

    port, dashboard = _free_port(), _free_port()
    ray = Path(sys.executable).with_name("ray")
    log = tmp_path_factory.mktemp("ray") / "ray.log"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    with open(log, "wb") as out:
        head = subprocess.Popen(
            [str(ray), "start", "--head", "--block", f"--port={port}", f"--dashboard-port={dashboard}",
             "--dashboard-host=127.0.0.1", "--include-dashboard=true", "--num-cpus=2",
             "--disable-usage-stats",
            # every port of its own: another Ray on this machine (a test's private one) must not collide
            *(f"--{name}={_free_port()}" for name in ("ray-client-server-port", "dashboard-agent-listen-port",
              "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port", "node-manager-port",
              "object-manager-port"))],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.monotonic() + 120
    while not dashboard_up(address):
        if head.poll() is not None or time.monotonic() > deadline:
            os.killpg(head.pid, signal.SIGKILL)
            pytest.fail(f"the Ray head did not start: {log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.5)
    try:
        yield address
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        time.sleep(1)
        try:
            os.killpg(head.pid, signal.SIGKILL)  # whatever of the group is left
        except ProcessLookupError:
            pass
