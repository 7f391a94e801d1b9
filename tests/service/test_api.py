"""The job API on both databases, without a cluster: keys, datasets, jobs, events, errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from finetune.service.models import Job

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = (ROOT / "recipes" / "quickstart.yaml").read_text(encoding="utf-8")
DATA = (ROOT / "recipes" / "data" / "quickstart.jsonl").read_bytes()


def _recipe(path: str = "data/quickstart.jsonl", gpus: int = 1) -> str:
    return QUICKSTART.replace("path: data/quickstart.jsonl", f"path: {path}").replace("gpus: 1", f"gpus: {gpus}")


def _upload(world, who: str = "a", path: str = "data/quickstart.jsonl", body: bytes = DATA):
    return world.client.put("/v1/datasets/upload", params={"path": path}, content=body, headers=world.auth(who))


def _submit(world, who: str = "a", text: str | None = None, **headers: str):
    return world.client.post("/v1/jobs", content=(text or _recipe()).encode(),
                             headers={**world.auth(who), "Content-Type": "application/yaml", **headers})  # fmt: skip


def test_keys_are_required_and_checked(world) -> None:
    assert world.client.get("/v1/jobs").status_code == 401
    bad = world.client.get("/v1/jobs", headers={"Authorization": "Bearer ftk_t_nope"})
    assert bad.status_code == 401
    assert bad.json()["error"]["code"] == "unauthorized"
    assert world.client.get("/v1/jobs", headers=world.auth("a")).status_code == 200


def test_a_revoked_key_answers_401(world) -> None:
    made = world.client.post("/v1/admin/keys", json={"role": "tenant", "tenant_id": world.tenants["a"]},
                             headers=world.auth("admin"))  # fmt: skip
    assert made.status_code == 201, made.text
    key = made.json()
    headers = {"Authorization": f"Bearer {key['key']}"}
    assert world.client.get("/v1/jobs", headers=headers).status_code == 200
    assert world.client.post(f"/v1/admin/keys/{key['id']}/revoke", headers=world.auth("admin")).status_code == 200
    assert world.client.get("/v1/jobs", headers=headers).status_code == 401
    listed = world.client.get("/v1/admin/keys", headers=world.auth("admin")).json()
    assert all("key" not in k and "key_hash" not in k for k in listed)


def test_models_schema_and_validation(world) -> None:
    models = world.client.get("/v1/models", headers=world.auth("a")).json()
    assert any(m["id"] == "smollm2-135m-instruct" for m in models)
    assert all(m["country"] for m in models)
    schema = world.client.get("/v1/recipes/schema", headers=world.auth("a")).json()
    assert schema["title"] == "Fine-tuning recipe"
    ok = world.client.post("/v1/recipes/validate", content=QUICKSTART.encode(), headers=world.auth("a")).json()
    assert ok["valid"] and ok["recipe"]["training"]["epochs"] == 10
    bad = world.client.post("/v1/recipes/validate", content=b"model:\n  id: nope\ndata:\n  path: x.jsonl\n",
                            headers=world.auth("a")).json()  # fmt: skip
    assert not bad["valid"]
    assert any(i["path"] == "model.id" and i["line"] == 2 for i in bad["issues"])


def test_upload_checks_the_rows_and_reports_each_bad_one_at_its_line(world) -> None:
    planted = DATA.rstrip(b"\n") + b'\n{"messages": [{"role": "user"}]}\nnot json\n'
    answer = _upload(world, body=planted)
    assert answer.status_code == 201, answer.text
    data = answer.json()
    lines = DATA.count(b"\n")
    assert data["status"] == "ok" and data["format"] == "messages" and data["rows"] == lines
    assert {(i["file"], i["line"]) for i in data["issues"]} == {
        ("data/quickstart.jsonl", lines + 1),
        ("data/quickstart.jsonl", lines + 2),
    }
    assert world.bucket("a").read_bytes("data/quickstart.jsonl") == planted
    again = _upload(world)
    assert again.status_code == 409
    listed = world.client.get("/v1/datasets", headers=world.auth("a")).json()
    assert [d["id"] for d in listed["data"]] == [data["id"]]
    assert world.client.get(f"/v1/datasets/{data['id']}", headers=world.auth("b")).status_code == 404
    assert world.client.delete(f"/v1/datasets/{data['id']}", headers=world.auth("a")).status_code == 204
    assert not world.bucket("a").exists("data/quickstart.jsonl")


def test_registration_checks_a_file_put_there_with_s3_tools(world) -> None:
    world.bucket("a").write_bytes("datasets/own.jsonl", DATA)
    answer = world.client.post("/v1/datasets", json={"path": "datasets/own.jsonl"}, headers=world.auth("a"))
    assert answer.status_code == 201, answer.text
    assert answer.json()["rows"] == DATA.count(b"\n")
    missing = world.client.post("/v1/datasets", json={"path": "datasets/none.jsonl"}, headers=world.auth("a"))
    assert missing.status_code == 422 and missing.json()["error"]["param"] == "path"


@pytest.mark.parametrize("path", ["../escape.jsonl", "/abs.jsonl", "a/../../b.jsonl", "data/x.exe"])
def test_paths_outside_the_bucket_or_of_other_kinds_are_refused(world, path: str) -> None:
    answer = _upload(world, path=path)
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"]["code"] == "invalid_request"


def test_an_upload_over_the_limit_is_refused_before_it_is_read(tmp_path: Path, db_url: str) -> None:
    from tests.service.conftest import make_world

    world = make_world(db_url, tmp_path / "data", max_upload_bytes=1000, max_body_bytes=500)
    with world.client:
        big = _upload(world, body=b"x" * 5000)
        assert big.status_code == 413 and big.json()["error"]["code"] == "too_large"
        assert not world.bucket("a").exists("data/quickstart.jsonl")
        body = world.client.post("/v1/recipes/validate", content=b"#" * 600, headers=world.auth("a"))
        assert body.status_code == 413
    world.svc.db.kw["bind"].dispose()


def test_jobs_are_created_idempotently_listed_and_scoped(world) -> None:
    assert _upload(world).status_code == 201
    first = _submit(world, **{"Idempotency-Key": "k1"})
    assert first.status_code == 201, first.text
    job = first.json()
    assert job["state"] == "queued" and job["queue_position"] == 1 and job["gpus"] == 1
    again = _submit(world, **{"Idempotency-Key": "k1"})
    assert again.status_code == 200 and again.json()["id"] == job["id"]
    assert again.headers["Idempotent-Replayed"] == "true"
    other = _submit(world, text=_recipe().replace("epochs: 10", "epochs: 2"), **{"Idempotency-Key": "k1"})
    assert other.status_code == 409
    second = _submit(world).json()
    listed = world.client.get("/v1/jobs", params={"limit": 1}, headers=world.auth("a")).json()
    assert [j["id"] for j in listed["data"]] == [second["id"]] and listed["has_more"]
    rest = world.client.get("/v1/jobs", params={"after": listed["next_after"]}, headers=world.auth("a")).json()
    assert [j["id"] for j in rest["data"]] == [job["id"]] and not rest["has_more"]
    assert world.client.get("/v1/jobs", headers=world.auth("b")).json()["data"] == []
    for path in (f"/v1/jobs/{job['id']}", f"/v1/jobs/{job['id']}/events", f"/v1/jobs/{job['id']}/metrics"):
        assert world.client.get(path, headers=world.auth("b")).status_code == 404
        assert world.client.get(path, headers=world.auth("ops")).status_code == 403
    assert world.client.get("/v1/jobs/job-nope", headers=world.auth("a")).status_code == 404


def test_bad_recipes_get_located_issues(world) -> None:
    syntax = _submit(world, text="model: [unclosed\n")
    assert syntax.status_code == 422 and syntax.json()["error"]["issues"][0]["line"] is not None
    denied = _submit(world, text=_recipe().replace("smollm2-135m-instruct", "qwen2.5-7b-instruct"))
    assert denied.status_code == 422
    assert any(i["path"] == "model.id" for i in denied.json()["error"]["issues"])
    assert _upload(world).status_code == 201
    greedy = _submit(world, text=_recipe(gpus=4))
    assert greedy.status_code == 422 and greedy.json()["error"]["param"] == "resources.gpus"
    assert "2 per job" in greedy.json()["error"]["message"]
    missing = _submit(world, text=_recipe(path="data/absent.jsonl"))
    assert missing.status_code == 422 and missing.json()["error"]["param"] == "data.path"
    assert world.client.get("/v1/jobs", headers=world.auth("a")).json()["data"] == []


def test_cancel_a_queued_job_and_clone_it_with_changes(world) -> None:
    assert _upload(world).status_code == 201
    job = _submit(world).json()
    cancelled = world.client.post(f"/v1/jobs/{job['id']}/cancel", headers=world.auth("a"))
    assert cancelled.status_code == 202 and cancelled.json()["state"] == "cancelled"
    assert world.client.post(f"/v1/jobs/{job['id']}/cancel", headers=world.auth("a")).status_code == 409
    events = world.client.get(f"/v1/jobs/{job['id']}/events", headers=world.auth("a")).json()["data"]
    assert [(e["position"], e["data"]["state"]) for e in events] == [(1, "queued"), (2, "cancelled")]
    clone = world.client.post(f"/v1/jobs/{job['id']}/clone", json={"changes": {"training": {"epochs": 3}}},
                              headers=world.auth("a"))  # fmt: skip
    assert clone.status_code == 201, clone.text
    assert clone.json()["recipe"]["training"]["epochs"] == 3 and clone.json()["cloned_from"] == job["id"]
    assert world.client.post(f"/v1/jobs/{job['id']}/clone", json={}, headers=world.auth("b")).status_code == 404


def test_ops_see_every_tenants_jobs_without_content(world) -> None:
    assert _upload(world).status_code == 201 and _upload(world, "b").status_code == 201
    a, b = _submit(world).json(), _submit(world, "b").json()
    page = world.client.get("/v1/ops/jobs", headers=world.auth("ops")).json()
    assert {j["id"] for j in page["data"]} == {a["id"], b["id"]}
    assert all("recipe" not in j and "error" not in j for j in page["data"])
    queue = world.client.get("/v1/ops/queue", headers=world.auth("ops")).json()
    assert [q["id"] for q in queue["queued"]] == [a["id"], b["id"]] and queue["jobs_by_state"]["queued"] == 2
    metrics = world.client.get("/metrics", headers=world.auth("ops"))
    assert metrics.status_code == 200 and 'finetune_jobs{state="queued"} 2.0' in metrics.text
    assert world.client.get("/metrics", headers=world.auth("a")).status_code == 403
    for path in ("/v1/datasets", "/v1/jobs"):
        assert world.client.get(path, headers=world.auth("ops")).status_code == 403


def test_health(world) -> None:
    assert world.client.get("/healthz").json() == {"status": "ok"}
    ready = world.client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"]["database"] == "ok"


def test_job_rows_hold_the_resolved_recipe(world) -> None:
    assert _upload(world).status_code == 201
    job = _submit(world).json()
    with world.svc.db() as session:
        row = session.get(Job, job["id"])
        assert row is not None and row.recipe["model"]["id"] == "smollm2-135m-instruct"
        assert row.tenant_id == world.tenants["a"] and row.term_id == world.term


def test_the_event_stream_resumes_after_the_last_event_id_and_ends_with_the_job(world) -> None:
    assert _upload(world).status_code == 201
    job = _submit(world).json()
    assert world.client.post(f"/v1/jobs/{job['id']}/cancel", headers=world.auth("a")).status_code == 202

    def stream(**headers: str) -> list[tuple[str, str]]:
        seen = []
        with world.client.stream("GET", f"/v1/jobs/{job['id']}/events/stream",
                                 headers={**world.auth("a"), **headers}) as answer:  # fmt: skip
            assert answer.status_code == 200
            for line in answer.iter_lines():
                if line.startswith(("id: ", "event: ")):
                    seen.append(tuple(line.split(": ", 1)))
        return seen

    assert stream() == [("id", "1"), ("event", "state"), ("id", "2"), ("event", "state")]
    assert stream(**{"Last-Event-ID": "1"}) == [("id", "2"), ("event", "state")]
    assert stream(**{"Last-Event-ID": "2"}) == []
    bad = world.client.get(f"/v1/jobs/{job['id']}/events/stream", headers={**world.auth("a"), "Last-Event-ID": "x"})
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "Last-Event-ID"
    assert world.client.get(f"/v1/jobs/{job['id']}/events/stream", headers=world.auth("b")).status_code == 404


def test_a_live_stream_gets_events_written_while_it_waits(world) -> None:
    import threading
    import time

    from finetune.service.history import add_events, transition

    assert _upload(world).status_code == 201
    job = _submit(world).json()

    def write() -> None:  # what the dispatcher does while a job runs, then the job's end
        time.sleep(0.5)
        with world.svc.db() as session:
            row = session.get(Job, job["id"])
            assert row is not None
            for step in (1, 2, 3):
                add_events(session, row, [("step", {"step": step, "loss": 1.0 / step}, step, None)])
                session.commit()
                time.sleep(0.2)
            transition(session, row, "cancelled", reason="cancelled")
            session.commit()

    writer = threading.Thread(target=write)
    writer.start()
    kinds = []
    with world.client.stream("GET", f"/v1/jobs/{job['id']}/events/stream", headers=world.auth("a")) as answer:
        for line in answer.iter_lines():
            if line.startswith("event: "):
                kinds.append(line[7:])
    writer.join()
    assert kinds == ["state", "step", "step", "step", "state"]
