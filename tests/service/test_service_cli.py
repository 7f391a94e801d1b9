"""``finetune serve`` and ``finetune admin``, through the real argument parser, on both databases."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from finetune.cli import main
from finetune.service.models import utcnow

#: Settings that would change what the commands do, unset for every test.
_ENVIRONMENT = ("RAY_ADDRESS", "FINETUNE_RAY_ADDRESS", "FINETUNE_STORAGE_URL", "FINETUNE_SIGNING_KEY",
                "FINETUNE_S3_SECRET_ACCESS_KEY")  # fmt: skip


def run(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def run_json(*args: str) -> Any:
    code, out, err = run(*args, "--json")
    assert code == 0, err
    return json.loads(out)


def _clean(monkeypatch: pytest.MonkeyPatch, data_dir: Path) -> None:
    for name in [n for n in os.environ if n.startswith("FINETUNE_SERVICE_")] + list(_ENVIRONMENT):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FINETUNE_DATA_DIR", str(data_dir))
    monkeypatch.setenv("FINETUNE_SERVICE_DISPATCHER", "false")


@pytest.fixture
def sqlite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The embedded defaults: the database is ``<data dir>/service.db``, made by the first command."""
    _clean(monkeypatch, tmp_path / "data")
    return tmp_path / "data"


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each test on the embedded SQLite file, then on a new PostgreSQL database (still in embedded mode)."""
    _clean(monkeypatch, tmp_path / "data")
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'data' / 'service.db'}"
    url = str(request.getfixturevalue("postgres_url"))
    monkeypatch.setenv("FINETUNE_SERVICE_DATABASE_URL", url)
    return url


@contextmanager
def api() -> Iterator[Any]:
    """The service's app on the settings of the environment, as ``finetune serve`` builds it."""
    from fastapi.testclient import TestClient

    from finetune.service.app import create_app
    from finetune.service.config import ServiceSettings
    from finetune.settings import Settings

    app = create_app(ServiceSettings(dispatcher=False), Settings())
    try:
        with TestClient(app) as client:
            yield client
    finally:
        app.state.service.db.kw["bind"].dispose()


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _open_term(term_id: str = "term-1") -> dict[str, Any]:
    started = (utcnow() - timedelta(days=1)).isoformat()
    return run_json("admin", "term", "create", term_id, "--starts", started)


def test_a_tenant_made_here_calls_the_api_until_its_key_is_revoked(database: str) -> None:
    made = run_json("admin", "tenant", "create", "Acme 甲", "--time-zone", "Europe/Paris")
    assert {"tenant_id", "name", "key"} <= set(made) and made["name"] == "Acme 甲"
    assert made["key"].startswith("ftk_t_") and made["tenant_id"].startswith("tn-")
    with api() as client:
        assert client.get("/v1/jobs", headers=_bearer(made["key"])).json()["error"]["code"] == "no_active_term"
        term = _open_term()
        grant = run_json("admin", "grant", "set", made["tenant_id"], term["id"], "--gpus-per-job", "1",
                         "--gpus-held", "2", "--points", "50")  # fmt: skip
        assert (grant["gpus_per_job"], grant["gpus_held"], grant["points"], grant["tier"]) == (1, 2, 50.0, "L1")
        assert client.get("/v1/jobs", headers=_bearer(made["key"])).status_code == 200

        code, out, err = run("admin", "key", "revoke", made["key_id"])
        assert code == 0 and f"key {made['key_id']} revoked at " in out, err
        assert client.get("/v1/jobs", headers=_bearer(made["key"])).status_code == 401
        code, out, _ = run("admin", "key", "revoke", made["key_id"])
        assert code == 0 and "was already revoked" in out


def test_lists_show_what_was_made_and_never_a_key(database: str) -> None:
    a = run_json("admin", "tenant", "create", "A")
    b = run_json("admin", "tenant", "create", "B")
    _open_term("2026-q4")
    for tenant in (a, b):
        run_json("admin", "grant", "set", tenant["tenant_id"], "2026-q4", "--tier", "L2")
    ops = run_json("admin", "key", "create", "--role", "ops", "--name", "monitoring")
    extra = run_json("admin", "key", "create", "--role", "tenant", "--tenant", a["tenant_id"])
    assert ops["key"].startswith("ftk_o_") and extra["tenant_id"] == a["tenant_id"]

    assert [t["name"] for t in run_json("admin", "tenant", "list")] == ["A", "B"]
    assert [t["id"] for t in run_json("admin", "term", "list")] == ["2026-q4"]
    grants = run_json("admin", "grant", "list", "--tenant", b["tenant_id"])
    assert [(g["tenant_id"], g["tier"], g["gpus_per_job"]) for g in grants] == [(b["tenant_id"], "L2", 8)]

    code, out, _ = run("admin", "key", "list")
    assert code == 0 and out.split()[:3] == ["id", "role", "tenant_id"] and "monitoring" in out
    listed = run_json("admin", "key", "list")
    assert {k["id"] for k in listed} == {a["key_id"], b["key_id"], ops["id"], extra["id"]}
    text = out + json.dumps(listed)
    assert all(made["key"] not in text for made in (a, b, ops, extra))
    assert not any({"key", "key_hash"} & set(k) for k in listed)
    assert {k["id"] for k in run_json("admin", "key", "list", "--tenant", a["tenant_id"])} == {a["key_id"], extra["id"]}

    code, out, _ = run("admin", "tenant", "list")
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["id", "name", "time_zone", "created_at"]
    assert lines[1].startswith(a["tenant_id"]) and " A " in lines[1]


def test_a_grant_changed_keeps_what_was_not_given(sqlite: Path) -> None:
    tenant = run_json("admin", "tenant", "create", "A")
    _open_term()
    run_json("admin", "grant", "set", tenant["tenant_id"], "term-1", "--gpus-per-job", "2", "--gpus-held", "4")
    changed = run_json("admin", "grant", "set", tenant["tenant_id"], "term-1", "--points", "12.5", "--tier", "L3")
    assert (changed["gpus_per_job"], changed["gpus_held"], changed["points"], changed["tier"]) == (2, 4, 12.5, "L3")
    assert len(run_json("admin", "grant", "list")) == 1


def test_requests_that_cannot_be_done_exit_2_with_their_reason_and_change_nothing(sqlite: Path) -> None:
    tenant = run_json("admin", "tenant", "create", "Acme")["tenant_id"]
    _open_term("t1")
    cases = [
        (["tenant", "create", "Acme"], "a tenant named 'Acme' exists already"),
        (["tenant", "create", "Bee", "--time-zone", "Mars/Olympus"], "unknown time zone 'Mars/Olympus'"),
        (["term", "create", "Bad_Term"], "invalid term id 'Bad_Term'"),
        (["term", "create", "t1"], "term 't1' exists already"),
        (["term", "create", "t2", "--starts", "yesterday"], "--starts: 'yesterday' is not an ISO 8601 time"),
        (["term", "create", "t2", "--ends", "2026-10-01T00:00:00"], "--ends: give the time with its offset"),
        (["term", "create", "t2", "--starts", "2026-10-02T00:00:00Z", "--ends", "2026-10-01T00:00:00Z"],
         "a term ends after it starts"),
        (["grant", "set", "tn-nope", "t1"], "no tenant 'tn-nope'"),
        (["grant", "set", tenant, "nope"], "no term 'nope'"),
        (["grant", "set", tenant, "t1", "--gpus-per-job", "4", "--gpus-held", "2"], "GPUs per job is at least 1"),
        (["grant", "set", tenant, "t1", "--points", "-1"], "storage and points cannot be negative"),
        (["key", "create", "--role", "tenant"], "a tenant key needs --tenant ID"),
        (["key", "create", "--role", "ops", "--tenant", tenant], "ops and admin keys belong to no tenant"),
        (["key", "create", "--role", "tenant", "--tenant", "tn-nope"], "no tenant 'tn-nope'"),
        (["key", "create", "--role", "admin", "--name", "x" * 101], "--name: at most 100 characters"),
        (["key", "revoke", "key-nope"], "no key 'key-nope'"),
    ]  # fmt: skip
    for args, message in cases:
        code, out, err = run("admin", *args)
        assert (code, out) == (2, ""), (args, out, err)
        assert message in err and "Traceback" not in err, (args, err)
        code, out, _ = run("admin", *args, "--json")
        error = json.loads(out)
        assert code == 2 and message in error["error"] and error["fault"] == "tenant", args
    assert [t["id"] for t in run_json("admin", "tenant", "list")] == [tenant]
    assert [t["id"] for t in run_json("admin", "term", "list")] == ["t1"]
    assert run_json("admin", "grant", "list") == [] and len(run_json("admin", "key", "list")) == 1


def _no_server(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """uvicorn.run replaced by a recorder: what the server would have served, and where."""
    import uvicorn

    served: list[dict[str, Any]] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: served.append({"app": app, **kwargs}))
    return served


def test_production_without_its_settings_does_not_start(sqlite: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    served = _no_server(monkeypatch)
    monkeypatch.setenv("FINETUNE_SERVICE_MODE", "production")
    code, out, err = run("serve")
    assert (code, out) == (2, "") and "Traceback" not in err
    assert "the service cannot start in production mode" in err
    for missing in ("FINETUNE_SERVICE_DATABASE_URL", "FINETUNE_STORAGE_URL", "RAY_ADDRESS", "FINETUNE_SIGNING_KEY"):
        assert missing in err
    code, _, err = run("serve", "--demo")
    assert code == 2 and "--demo serves embedded defaults only" in err
    monkeypatch.setenv("FINETUNE_SERVICE_MODE", "embedded")
    monkeypatch.setenv("FINETUNE_SERVICE_PORT", "eighty")
    code, _, err = run("serve")
    assert code == 2 and "FINETUNE_SERVICE_PORT" in err and "Traceback" not in err
    assert served == [] and not (sqlite / "service.db").exists()


def test_production_admin_needs_its_database_migrated(
    postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _clean(monkeypatch, tmp_path / "data")
    monkeypatch.setenv("FINETUNE_SERVICE_MODE", "production")
    code, _, err = run("admin", "tenant", "list")
    assert code == 2 and "FINETUNE_SERVICE_DATABASE_URL: must be set in production mode" in err
    monkeypatch.setenv("FINETUNE_SERVICE_DATABASE_URL", postgres_url)
    code, _, err = run("admin", "tenant", "list")
    assert code == 2 and "run 'finetune admin migrate' first" in err
    code, out, err = run("admin", "migrate")
    assert code == 0 and "at revision" in out, err
    assert run("admin", "tenant", "list")[:2] == (0, "(none)\n")
    assert not (tmp_path / "data" / "service.db").exists()


def test_a_database_that_does_not_answer_is_named_without_its_password(
    sqlite: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FINETUNE_SERVICE_DATABASE_URL", "postgresql+psycopg://ops:hunter2@127.0.0.1:1/finetune")
    code, _, err = run("admin", "tenant", "list")
    assert code == 1 and "the database at postgresql+psycopg://ops:***@127.0.0.1:1/finetune does not answer" in err
    assert "hunter2" not in err and "Traceback" not in err


def test_serve_demo_prints_a_working_key_at_each_start(sqlite: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fastapi.testclient import TestClient

    served = _no_server(monkeypatch)
    first, second = run("serve", "--demo"), run("serve", "--demo", "--host", "0.0.0.0", "--port", "9001")
    assert first[0] == second[0] == 0
    shown = [dict(line.rsplit(maxsplit=1) for line in out.splitlines()) for _, out, _ in (first, second)]
    assert shown[0]["demo tenant"] == shown[1]["demo tenant"]
    assert shown[0]["demo API key"] != shown[1]["demo API key"]
    assert [(s["host"], s["port"]) for s in served] == [("127.0.0.1", 8000), ("0.0.0.0", 9001)]
    client = TestClient(served[1]["app"])
    for keys in shown:
        assert client.get("/v1/jobs", headers=_bearer(keys["demo API key"])).status_code == 200
    (grant,) = run_json("admin", "grant", "list")
    assert (grant["term_id"], grant["gpus_per_job"], grant["gpus_held"]) == ("demo", 1, 2)
    assert [t["name"] for t in run_json("admin", "tenant", "list")] == ["demo"]
    for s in served:
        s["app"].state.service.db.kw["bind"].dispose()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str, key: str | None = None) -> int:
    request = urllib.request.Request(url, headers=_bearer(key) if key else {})
    with urllib.request.urlopen(request, timeout=2) as response:
        return int(response.status)


@pytest.mark.integration
def test_serve_answers_over_http_and_stops_on_a_signal(tmp_path: Path) -> None:
    port = _free_port()
    env = {n: v for n, v in os.environ.items() if not n.startswith("FINETUNE_SERVICE_") and n not in _ENVIRONMENT}
    env |= {"FINETUNE_DATA_DIR": str(tmp_path / "data"), "FINETUNE_SERVICE_DISPATCHER": "false"}
    entry = "import sys; from finetune.cli import main; sys.exit(main())"
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        server = subprocess.Popen([sys.executable, "-c", entry, "serve", "--demo", "--port", str(port)],
                                  stdout=stdout, stderr=stderr, env=env)  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            assert server.poll() is None, err.read_text()
            try:
                assert _get(f"http://127.0.0.1:{port}/healthz") == 200
                break
            except OSError:
                assert time.monotonic() < deadline, err.read_text()
                time.sleep(0.2)
        key = dict(line.rsplit(maxsplit=1) for line in out.read_text().splitlines())["demo API key"]
        assert _get(f"http://127.0.0.1:{port}/v1/jobs", key) == 200
    finally:
        server.send_signal(signal.SIGINT)
        code = server.wait(timeout=15)
    assert code == 0, err.read_text()
    assert "Uvicorn running" in err.read_text() and "ftk_" not in err.read_text()
