"""Every route × every caller × whose ids, from the app's own OpenAPI document, on both databases.

Tenant a and tenant b each own a dataset, a queued job and a finished one. Each operation the
document lists is called by no key, a revoked key, tenant a, tenant b, ops and admin, with the path
ids of a's resources and of b's. What must hold:

- no key or a revoked key: 401 everywhere but the probes (/healthz, /readyz);
- a tenant calling with the other tenant's ids: 404, the very answer an id that never existed gets,
  and nothing of the other tenant's changes (database rows and bucket compared before and after);
- ops and admin: 403 on every tenant route, and no answer of theirs carries a tenant's content;
- tenants: 403 on ops and admin routes; ops: 403 on admin routes.

Routes are classed from the document (path prefixes, tags, and the role their security names); a
route that fits no class fails the test, so a new route has to be classed here before it ships.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select

from finetune.service.ids import new_id
from finetune.service.models import ApiKey, Checkpoint, Dataset, Event, Grant, Job

ROOT = Path(__file__).resolve().parents[2]
RECIPE = (ROOT / "recipes" / "quickstart.yaml").read_text(encoding="utf-8")
DATA = (ROOT / "recipes" / "data" / "quickstart.jsonl").read_bytes()
DATA_PATH = "data/quickstart.jsonl"
B_DATA = "".join(
    json.dumps({"messages": [{"role": "user", "content": f"b asks {i}"}, {"role": "assistant", "content": f"b {i}"}]})
    + "\n"
    for i in range(8)
).encode()

CALLERS = ("none", "revoked", "a", "b", "ops", "admin")
TENANTS = ("a", "b")
PUBLIC_PATHS = ("/healthz", "/readyz")
#: Path parameters the matrix knows how to fill, and the kind of id each is. Tenants own jobs and
#: datasets (and keys); an id of another kind is a fresh one, which no one owns.
ID_KINDS = {"job_id": "job", "dataset_id": "dataset", "key_id": "key", "benchmark_id": "bench"}
#: Query parameters a route requires, filled alike for every caller.
QUERIES = {"path": DATA_PATH}


def route_class(path: str, op: dict[str, Any]) -> str | None:
    """``public``, ``catalog`` (any key, no tenant's content), ``tenant``, ``ops`` or ``admin``; None
    for a route that fits none, or whose declared security contradicts its class."""
    if path.startswith(("/v1/ops/", "/metrics")):
        cls = "ops"
    elif path.startswith("/v1/admin/"):
        cls = "admin"
    elif path in PUBLIC_PATHS:
        cls = "public"
    elif path.startswith("/v1/"):
        cls = "catalog" if "catalog" in op.get("tags", []) else "tenant"
    else:
        return None
    security = op.get("security")
    roles = {role for requirement in security or [] for scopes in requirement.values() for role in scopes}
    expected = {"public": None, "catalog": set(), "tenant": {"tenant"}, "ops": {"ops"}, "admin": {"admin"}}[cls]
    declared = None if security is None else roles
    return cls if declared == expected else None


@dataclass(frozen=True)
class Operation:
    method: str
    path: str
    op: dict[str, Any]

    @property
    def label(self) -> str:
        return f"{self.method} {self.path}"

    @property
    def ids(self) -> list[str]:
        return [p["name"] for p in self.op.get("parameters", []) if p["in"] == "path"]

    @property
    def streams(self) -> bool:
        """An event stream: called with finished jobs only, so that a leaked stream still ends."""
        return any("text/event-stream" in r.get("content", {}) for r in self.op["responses"].values())

    @property
    def safe(self) -> bool:
        return self.method in ("GET", "HEAD")


def operations(doc: dict[str, Any]) -> list[Operation]:
    return [Operation(m.upper(), path, op) for path, item in doc["paths"].items() for m, op in item.items()]


def test_routes_are_classed_by_prefix_tag_and_declared_role() -> None:
    tenant = {"tags": ["jobs"], "security": [{"bearer": ["tenant"]}]}
    assert route_class("/v1/jobs/{job_id}", tenant) == "tenant"
    assert route_class("/v1/models", {"tags": ["catalog"], "security": [{"bearer": []}]}) == "catalog"
    assert route_class("/metrics", {"security": [{"bearer": ["ops"]}]}) == "ops"
    assert route_class("/v1/admin/keys", {"security": [{"bearer": ["admin"]}]}) == "admin"
    assert route_class("/healthz", {}) == "public"
    assert route_class("/v2/jobs", tenant) is None  # outside every class
    assert route_class("/v1/jobs", {"tags": ["jobs"], "security": [{"bearer": []}]}) is None  # any key: a leak
    assert route_class("/v1/ops/usage", {"security": [{"bearer": ["tenant"]}]}) is None
    assert route_class("/v1/jobs", {"tags": ["jobs"]}) is None  # no key at all


@dataclass
class Tenant:
    """What a tenant owns: ids to call with, and what of its content no one else may see."""

    ids: dict[str, str]
    finished_job: str
    secrets: list[str]  # content: recipe name, data text, the data's digest
    names: list[str]  # its resources' ids


@dataclass
class Matrix:
    world: Any
    doc: dict[str, Any]
    owners: dict[str, Tenant] = field(default_factory=dict)
    revoked: str = ""
    problems: list[str] = field(default_factory=list)

    def headers(self, caller: str) -> dict[str, str]:
        if caller == "none":
            return {}
        if caller == "revoked":
            return {"Authorization": f"Bearer {self.revoked}"}
        return self.world.auth(caller)

    def call(self, operation: Operation, caller: str, ids: dict[str, str]) -> Any:
        url = operation.path.format(**ids)
        params = {p["name"]: QUERIES[p["name"]] for p in operation.op.get("parameters", [])
                  if p["in"] == "query" and p.get("required") and p["name"] in QUERIES}  # fmt: skip
        headers, content = self.headers(caller), self.body(operation, caller)
        if content is not None:
            headers["Content-Type"], data = content
            return self.world.client.request(operation.method, url, params=params, headers=headers, content=data)
        return self.world.client.request(operation.method, url, params=params, headers=headers)

    def body(self, operation: Operation, caller: str) -> tuple[str, bytes] | None:
        """A valid body for the operation's declared media type and schema."""
        request = operation.op.get("requestBody")
        if request is None:
            return None
        content = request["content"]
        if "application/octet-stream" in content:
            return "application/octet-stream", B_DATA if caller == "b" else DATA
        if "application/yaml" in content:
            return "application/yaml", RECIPE.encode()
        schema = content["application/json"]["schema"]["$ref"].rsplit("/", 1)[-1]
        bodies = {
            "RegisterDataset": {"path": DATA_PATH},
            "CloneJob": {"changes": {"training": {"epochs": 2}}},
            "NewTenant": {"name": "Matrix tenant"},
            "NewTerm": {"id": "matrix-term"},
            "NewKey": {"role": "ops"},
            "BenchmarkRequest": {"gpus": 1},
            # b's grant as it is: an admin's write that changes nothing of a tenant's
            "GrantIn": {"tenant_id": self.world.tenants["b"], "term_id": self.world.term, "gpus_per_job": 2,
                        "gpus_held": 2, "points": 1000},
        }  # fmt: skip
        assert schema in bodies, f"{operation.label}: give the matrix a body for {schema}"
        return "application/json", json.dumps(bodies[schema]).encode()

    def ids_of(self, owner: str, operation: Operation) -> dict[str, str]:
        tenant = self.owners[owner]
        owned = {**tenant.ids, "job_id": tenant.finished_job} if operation.streams else tenant.ids
        return {name: owned[name] if name in owned else new_id(ID_KINDS[name]) for name in operation.ids}

    def problem(self, operation: Operation, caller: str, owner: str | None, answer: Any, why: str) -> None:
        whose = f" with {owner}'s ids" if owner else ""
        self.problems.append(f"{operation.label} as {caller}{whose}: {why} (got {answer.status_code}: "
                             f"{answer.text[:200]!r})")  # fmt: skip

    def leaks(self, caller: str, cls: str, answer: Any) -> list[str]:
        """What of a tenant's this answer shows that the caller may not see (the ids it sent aside)."""
        text, sent = answer.text, answer.request.url.path
        found = []
        for who, tenant in self.owners.items():
            if caller == who and cls == "tenant":
                continue
            # ops see ids, never content
            visible = [*tenant.names] if caller in ("ops", "admin") else [n for n in tenant.names if n in sent]
            for secret in [*tenant.secrets, *tenant.names]:
                if secret not in visible and (secret in text or json.dumps(secret)[1:-1] in text):
                    found.append(f"{who}'s {secret!r}")
        return found


def expected(cls: str, caller: str, owner: str | None) -> str:
    if cls == "public":
        return "open"
    if caller in ("none", "revoked"):
        return "unauthorized"
    if cls == "catalog":
        return "allowed"
    if cls == "tenant":
        if caller in ("ops", "admin"):
            return "forbidden"
        return "missing" if owner not in (None, caller) else "own"
    if cls == "ops":
        return "allowed" if caller in ("ops", "admin") else "forbidden"
    return "allowed" if caller == "admin" else "forbidden"


def check(matrix: Matrix, operation: Operation, cls: str, caller: str, owner: str | None) -> None:
    """Call the operation as ``caller`` with ``owner``'s ids (none: the route takes none); note what is wrong."""
    ids = matrix.ids_of(owner, operation) if owner else {}
    answer = matrix.call(operation, caller, ids)
    want = expected(cls, caller, owner)
    status = answer.status_code
    code = _code(answer)
    if status >= 500:
        matrix.problem(operation, caller, owner, answer, "a server error")
    elif want == "open" and status != 200:
        matrix.problem(operation, caller, owner, answer, "a probe answers anyone")
    elif want == "unauthorized" and (status, code) != (401, "unauthorized"):
        matrix.problem(operation, caller, owner, answer, "expected 401")
    elif want == "forbidden" and (status, code) != (403, "forbidden"):
        matrix.problem(operation, caller, owner, answer, "expected 403")
    elif want == "allowed" and status in (401, 403):
        matrix.problem(operation, caller, owner, answer, "expected the route to let its role in")
    elif want == "own" and (status in (401, 403) or (status == 404 and code != "not_ready")):
        matrix.problem(operation, caller, owner, answer, "expected the route to serve its owner")
    elif want == "missing":
        assert owner is not None
        never = {name: new_id(ID_KINDS[name]) for name in operation.ids}
        baseline = matrix.call(operation, caller, never)
        mine, theirs = _masked(answer, ids.values()), _masked(baseline, never.values())
        if status != 404 or (status, mine) != (baseline.status_code, theirs):
            matrix.problem(operation, caller, owner, answer, f"expected what a missing id gets ({baseline.text})")
    if leaked := matrix.leaks(caller, cls, answer):
        matrix.problem(operation, caller, owner, answer, f"shows {', '.join(leaked)}")


def _code(answer: Any) -> str | None:
    try:
        return answer.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None


def _masked(answer: Any, ids: Iterable[str]) -> str:
    """The body with the ids asked for replaced, so that two 404s can be compared."""
    text = answer.text
    for value in ids:
        text = text.replace(value, "<id>")
    return text


def _rows(items: Iterable[Any]) -> list[dict[str, Any]]:
    rows = [{c.key: getattr(r, c.key) for c in r.__table__.columns} for r in items]
    return sorted(rows, key=repr)


def snapshot(world: Any, who: str) -> dict[str, Any]:
    """Every database row and bucket file of the tenant's."""
    tenant = world.tenants[who]
    with world.svc.db() as session:
        state: dict[str, Any] = {
            model.__tablename__: _rows(session.scalars(select(model).where(model.tenant_id == tenant)))
            for model in (Dataset, Job, Grant, ApiKey)
        }
        jobs = [row["id"] for row in state["jobs"]]
        for model in (Event, Checkpoint):
            state[model.__tablename__] = _rows(session.scalars(select(model).where(model.job_id.in_(jobs))))
    bucket = world.bucket(who)
    state["bucket"] = [(name, size, bucket.read_bytes(name)) for name, size in bucket.walk_files()]
    return state


def _ok(answer: Any, status: int = 201) -> dict[str, Any]:
    assert answer.status_code == status, answer.text
    return answer.json()


def prepare(world: Any) -> Matrix:
    """Tenant a's and b's datasets and jobs (one queued, one finished), and a revoked key of a's."""
    matrix = Matrix(world, world.client.app.openapi())
    for who, data in (("a", DATA), ("b", B_DATA)):
        auth = world.auth(who)
        dataset = _ok(world.client.put("/v1/datasets/upload", params={"path": DATA_PATH}, content=data, headers=auth))
        recipe = RECIPE.replace("name: quickstart", f"name: secret-recipe-of-{who}")
        yaml = {**auth, "Content-Type": "application/yaml"}
        jobs = [_ok(world.client.post("/v1/jobs", content=recipe.encode(), headers=yaml)) for _ in range(2)]
        _ok(world.client.post(f"/v1/jobs/{jobs[1]['id']}/cancel", headers=auth), 202)
        made = _ok(world.client.post("/v1/admin/keys", json={"role": "tenant", "tenant_id": world.tenants[who]},
                                     headers=world.auth("admin")))  # fmt: skip
        _ok(world.client.post(f"/v1/admin/keys/{made['id']}/revoke", headers=world.auth("admin")), 200)
        if who == "a":
            matrix.revoked = made["key"]
        text = data.decode().splitlines()[0]
        content = json.loads(text)["messages"][0]["content"]
        matrix.owners[who] = Tenant(
            ids={"job_id": jobs[0]["id"], "dataset_id": dataset["id"], "key_id": made["id"]},
            finished_job=jobs[1]["id"],
            secrets=[f"secret-recipe-of-{who}", content, dataset["sha256"]],
            names=[dataset["id"], jobs[0]["id"], jobs[1]["id"]],
        )
    return matrix


def test_every_route_for_every_caller_and_every_owner(world) -> None:
    matrix = prepare(world)
    ops = operations(matrix.doc)
    found = {o.label: route_class(o.path, o.op) for o in ops}
    assert [label for label, cls in found.items() if cls is None] == [], "class these routes in test_matrix.py"
    classes = {label: cls for label, cls in found.items() if cls is not None}
    assert [o.label for o in ops if set(o.ids) - set(ID_KINDS)] == [], "give the matrix ids of these kinds"
    owned = set(matrix.owners["a"].ids)
    assert [o.label for o in ops if classes[o.label] == "tenant" and set(o.ids) - owned] == [], "own such ids"
    assert {"public", "catalog", "tenant", "ops", "admin"} == set(classes.values())

    # Strangers first: nobody but the owner may change anything of a tenant's.
    before = {who: snapshot(world, who) for who in TENANTS}
    for operation in sorted(ops, key=lambda o: not o.safe):
        cls = classes[operation.label]
        for caller in CALLERS:
            owners = [o for o in TENANTS if o != caller] if operation.ids else [None]
            for owner in owners:
                if owner is None and cls == "tenant" and caller in TENANTS:
                    continue  # a tenant's own writes come below
                check(matrix, operation, cls, caller, owner)
    after = {who: snapshot(world, who) for who in TENANTS}
    for who in TENANTS:
        changed = [part for part in before[who] if before[who][part] != after[who][part]]
        assert changed == [], f"calls of others changed tenant {who}'s {changed}"
    assert matrix.problems == []

    # Then each tenant on its own resources: the routes serve it (the ids above were real ones).
    for caller in TENANTS:
        for operation in sorted((o for o in ops if classes[o.label] == "tenant"), key=lambda o: not o.safe):
            check(matrix, operation, "tenant", caller, caller if operation.ids else None)
    assert matrix.problems == []
