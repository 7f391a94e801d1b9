"""The committed OpenAPI document is the app's, and it tells UI developers what they need: a summary
and a readable operation id per operation, the bearer key and the role each route needs, and every
error a route answers, in the one error envelope."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "openapi.py"
ENVELOPE = {"$ref": "#/components/schemas/ErrorEnvelope"}
PUBLIC = ("/healthz", "/readyz")
ROLES = {"tenant", "ops", "admin"}


def _script() -> Any:
    spec = importlib.util.spec_from_file_location("openapi_script", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script() -> Any:
    return _script()


@pytest.fixture(scope="module")
def doc(script: Any) -> dict[str, Any]:
    return script.document()


def operations(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(method.upper(), path, op) for path, item in doc["paths"].items() for method, op in item.items()]


def test_the_committed_document_is_current(script: Any, doc: dict[str, Any]) -> None:
    committed = script.TARGET.read_text(encoding="utf-8") if script.TARGET.exists() else ""
    assert committed == script.render(doc), (
        f"{script.TARGET.relative_to(ROOT)} does not match the app: run .venv/bin/python scripts/openapi.py"
    )


def test_the_script_checks_and_writes(script: Any, tmp_path: Path) -> None:
    out = tmp_path / "openapi.json"
    assert script.main(["--check", "--output", str(out)]) == 1
    assert script.main(["--output", str(out)]) == 0
    assert out.read_text(encoding="utf-8").endswith("}\n")
    assert script.main(["--check", "--output", str(out)]) == 0


def test_every_operation_has_a_summary_and_a_readable_unique_id(doc: dict[str, Any]) -> None:
    ids = [op.get("operationId", "") for _, _, op in operations(doc)]
    assert [i for i in ids if not re.fullmatch(r"[a-z][a-z0-9_]*", i)] == []
    assert sorted(i for i in set(ids) if ids.count(i) > 1) == []
    assert [f"{m} {p}" for m, p, op in operations(doc) if not op.get("summary", "").strip()] == []


def test_the_bearer_key_is_declared_on_every_route_but_the_probes(doc: dict[str, Any]) -> None:
    scheme = doc["components"]["securitySchemes"]["bearer"]
    assert scheme["type"] == "http" and scheme["scheme"] == "bearer"
    for method, path, op in operations(doc):
        if path in PUBLIC:
            assert "security" not in op, f"{method} {path} needs no key"
            continue
        assert [list(r) for r in op.get("security", [])] == [["bearer"]], f"{method} {path} takes the bearer key"
        roles = op["security"][0]["bearer"]
        assert set(roles) <= ROLES and len(roles) <= 1, f"{method} {path}: roles {roles}"


def test_every_route_declares_its_errors_in_the_envelope(doc: dict[str, Any]) -> None:
    assert set(doc["components"]["schemas"]["ErrorEnvelope"]["properties"]) == {"error"}
    missing = []
    for method, path, op in operations(doc):
        responses = op["responses"]
        for status, response in responses.items():
            if int(status) >= 400 and (path.startswith("/v1/") or int(status) < 500):
                schema = response.get("content", {}).get("application/json", {}).get("schema")
                assert schema == ENVELOPE, f"{method} {path} answers {status} outside the envelope"
        params = op.get("parameters", [])
        expected = set()
        if "security" in op:
            expected.add("401")
            if any(op["security"][0]["bearer"]):
                expected.add("403")
        if any(p["in"] == "path" for p in params):
            expected.add("404")
        if "requestBody" in op:
            expected |= {"400", "413", "422"}
        if params:
            expected.add("422")
        if path.startswith("/v1/"):
            assert "security" in op, f"{method} {path} is under /v1 and takes no key"
        missing += [f"{method} {path}: {status}" for status in sorted(expected - set(responses))]
    assert missing == []


def test_the_document_names_no_fastapi_default_error(doc: dict[str, Any]) -> None:
    """FastAPI's own 422 body (HTTPValidationError) is never what the service answers."""
    assert not {"HTTPValidationError", "ValidationError"} & set(doc["components"]["schemas"])
