"""Property-based fuzzing of every operation in the app's OpenAPI document, with schemathesis, in
process (ASGI), on both databases.

Tenant a calls its routes with generated inputs, schema-valid and schema-violating, and with the
ids of its real dataset and jobs as often as random ones; ops and admin keys do the same on their
routes. No answer may be a server error, a status the document does not declare, or a body or
header that breaks the documented schema; an input that violates the schema must be refused; a
route that takes a key must refuse a request without one. The examples are bounded and
derandomised, so every run sends the same requests.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

ROOT = Path(__file__).resolve().parents[2]
RECIPE = (ROOT / "recipes" / "quickstart.yaml").read_text(encoding="utf-8")
DATA = (ROOT / "recipes" / "data" / "quickstart.jsonl").read_bytes()

BOUNDED = settings(
    max_examples=15, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
)
#: Run on every answer. positive_data_acceptance is left out: a schema-valid string is rarely a valid
#: recipe or bucket path, and the service rightly refuses it (422).
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          response_headers_conformance, ignored_auth]  # fmt: skip


def _checks(operation: Any) -> list[Any]:
    """Schema-violating input must be refused, except in a text body: YAML or a file has no schema to
    violate on the wire (a generated ``false`` is sent as the text ``false``)."""
    body = operation.definition.raw.get("requestBody", {}).get("content", {})
    return CHECKS + ([negative_data_rejection] if not body or "application/json" in body else [])


def _ids(world: Any) -> tuple[dict[str, str], str]:
    """Tenant a's dataset, a queued job and a finished one (an event stream of it ends)."""
    auth = world.auth("a")
    upload = world.client.put("/v1/datasets/upload", params={"path": "data/quickstart.jsonl"}, content=DATA,
                              headers=auth)  # fmt: skip
    assert upload.status_code == 201, upload.text
    yaml = {**auth, "Content-Type": "application/yaml"}
    jobs = [world.client.post("/v1/jobs", content=RECIPE.encode(), headers=yaml).json()["id"] for _ in range(2)]
    assert world.client.post(f"/v1/jobs/{jobs[1]}/cancel", headers=auth).status_code == 202
    return {"dataset_id": upload.json()["id"], "job_id": jobs[0]}, jobs[1]


def _send_each(strategy: st.SearchStrategy[Any], headers: dict[str, str], checks: list[Any]) -> None:
    @given(case=strategy)
    @BOUNDED
    def run(case: Any) -> None:
        case.call_and_validate(headers=headers, checks=checks)

    run()


def fuzz(world: Any, key_for: Callable[[Any], str]) -> list[str]:
    """Fuzz every operation of the app's document, each with the key ``key_for`` names; the failures."""
    ids, finished = _ids(world)
    schema = schemathesis.openapi.from_asgi(
        "/openapi.json", world.client.app,
        config=schemathesis.Config.from_dict({"generation": {"with-security-parameters": False}}),
    )  # fmt: skip
    failures: list[str] = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), f"schemathesis cannot read an operation: {result.err()}"
        operation = result.ok()
        headers, checks = world.auth(key_for(operation)), _checks(operation)
        names = [p.name for p in operation.path_parameters]
        real = {name: ids[name] for name in names if name in ids}
        if "text/event-stream" in json.dumps(operation.definition.raw["responses"]):
            real["job_id"] = finished
        raw = operation.definition.raw
        negatable = "requestBody" in raw or any(p["in"] != "path" for p in raw.get("parameters", []))
        for mode in [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if negatable else []):
            strategy = operation.as_strategy(generation_mode=mode)
            if real and mode is GenerationMode.POSITIVE:
                strategy = st.one_of(strategy, operation.as_strategy(generation_mode=mode, path_parameters=real))
            try:
                _send_each(strategy, headers, checks)
            except Unsatisfiable:  # no input of this operation's can violate its schema (any string is an id)
                continue
            except (Exception, BaseExceptionGroup) as exc:
                failures.append(f"{operation.label} ({mode.value}, {key_for(operation)} key):\n{exc}")
    return failures


def test_every_route_holds_under_fuzzing(world) -> None:
    """Tenant a on every route but the operators'; the ops key on ops routes, the admin key on admin's."""
    operator = {"ops", "admin"}
    failures = fuzz(world, lambda o: next(iter(operator & set(o.tags or [])), "a"))
    assert not failures, "\n\n".join(failures)


# Regressions: what fuzzing found, and what probing the same kinds of input by hand found next.


def test_a_cursor_past_the_position_column_is_refused(world) -> None:
    """PostgreSQL compared ``after=2147483648`` with a 32-bit column and failed: a 500 (fuzzing)."""
    _, finished = _ids(world)
    auth = world.auth("a")
    for path in (f"/v1/jobs/{finished}/events", f"/v1/jobs/{finished}/events/stream"):
        answer = world.client.get(path, params={"after": 2**31}, headers=auth)
        assert answer.status_code == 422 and answer.json()["error"]["param"] == "after", answer.text
        assert world.client.get(path, params={"after": 2**31 - 1}, headers=auth).status_code == 200
    resumed = world.client.get(f"/v1/jobs/{finished}/events/stream", headers={**auth, "Last-Event-ID": str(2**40)})
    assert resumed.status_code == 422 and resumed.json()["error"]["param"] == "Last-Event-ID"


def test_a_nul_character_in_a_path_or_query_parameter_is_refused(world) -> None:
    """PostgreSQL cannot compare text holding NUL: every id, cursor and filter failed with a 500 (by hand)."""
    ids, _ = _ids(world)
    calls = [("a", "/v1/jobs", {"state": "\x00"}), ("a", "/v1/jobs", {"after": "job-\x00"}),
             ("a", "/v1/datasets", {"after": "\x00"}), ("a", f"/v1/jobs/{ids['job_id']}%00", {}),
             ("a", "/v1/datasets/ds-%00", {}), ("ops", "/v1/ops/jobs", {"tenant_id": "\x00"}),
             ("admin", "/v1/admin/keys/key-%00/revoke", {})]  # fmt: skip
    for who, path, params in calls:
        method = "POST" if path.endswith("/revoke") else "GET"
        answer = world.client.request(method, path, params=params, headers=world.auth(who))
        assert answer.status_code == 422, f"{path} {params}: {answer.text}"
        error = answer.json()["error"]
        assert error["code"] == "invalid_request" and "NUL" in error["message"] and error["param"]


def test_admin_names_and_ids_hold_no_control_character(world) -> None:
    """A tenant or key name, or a tenant id looked up, holding NUL failed on PostgreSQL with a 500 (by hand)."""
    admin = world.auth("admin")
    for path, body in (("/v1/admin/tenants", {"name": "x\x00y"}), ("/v1/admin/keys", {"role": "ops", "name": "n\x00"}),
                       ("/v1/admin/keys", {"role": "tenant", "tenant_id": "tn-\x00"}),
                       ("/v1/admin/grants", {"tenant_id": "\x00", "term_id": world.term})):  # fmt: skip
        answer = world.client.request("PUT" if path.endswith("grants") else "POST", path, json=body, headers=admin)
        assert answer.status_code == 422 and answer.json()["error"]["code"] == "invalid_request", answer.text
    assert world.client.post("/v1/admin/tenants", json={"name": "Tenant C 丙"}, headers=admin).status_code == 201


def test_a_term_outside_the_storable_years_is_refused(world) -> None:
    """A term starting on 9999-12-31 overflowed when its default end was added; one at year 1 with a
    +14:00 offset overflowed when converted to UTC: both 500s, on either database (by hand)."""
    admin = world.auth("admin")
    for name, when in (("starts_at", "9999-12-31T00:00:00+00:00"), ("starts_at", "0001-01-01T00:00:00+14:00"),
                       ("ends_at", "9999-12-31T23:59:59-14:00")):  # fmt: skip
        answer = world.client.post("/v1/admin/terms", json={"id": "far", name: when}, headers=admin)
        assert answer.status_code == 422 and answer.json()["error"]["param"] == name, answer.text
    made = world.client.post("/v1/admin/terms", json={"id": "2027-q1", "starts_at": "2027-01-01T00:00:00+08:00"},
                             headers=admin)  # fmt: skip
    assert made.status_code == 201, made.text


def test_an_unreadable_body_is_a_documented_400_in_the_envelope(world) -> None:
    """Bytes that are not UTF-8 sent as JSON: FastAPI answers 400, which the document did not declare
    (fuzzing)."""
    answer = world.client.post("/v1/datasets", content=b"\x8e\xff{", headers={**world.auth("a"),
                               "Content-Type": "application/json"})  # fmt: skip
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "bad_request"
    declared = world.client.app.openapi()["paths"]["/v1/datasets"]["post"]["responses"]
    assert declared["400"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorEnvelope"}
