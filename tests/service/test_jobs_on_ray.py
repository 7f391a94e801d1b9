"""Jobs through the service on a real local Ray cluster: the whole path over HTTP, a dataset refused
before any GPU is held, a cancel that stops the workers and keeps the checkpoints, and the ops'
throughput benchmark run on the cluster.

The three jobs and the benchmark are submitted together at the start of the module (the cluster
runs two at once; the benchmark waits until no tenant job is queued) and each test waits for its own.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.service.conftest import World, make_world

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = (ROOT / "recipes" / "quickstart.yaml").read_text(encoding="utf-8")
DATA = (ROOT / "recipes" / "data" / "quickstart.jsonl").read_bytes()
FINAL = ("succeeded", "failed", "cancelled")
BENCHMARK = {"gpus": 1, "runs": ["smollm2-135m-instruct:lora"], "seq_len": 256, "warmup": 1, "steps": 2}


def slow_recipe() -> str:
    """The quick start trained for long enough to be stopped, checkpointing every 20 steps."""
    slow = QUICKSTART.replace("epochs: 10", "epochs: 100").replace("micro_batch_size: 4", "micro_batch_size: 1")
    return slow.replace("  seed: 42", "  seed: 42\n  save_every_steps: 20")


def wait_for(world: World, job_id: str, done: Any, timeout: float = 240.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job = world.client.get(f"/v1/jobs/{job_id}", headers=world.auth("a")).json()
        if done(job):
            return dict(job)
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} still {job['state']} after {timeout} s: {job}")
        time.sleep(0.5)


def events(world: World, job_id: str) -> list[dict[str, Any]]:
    answer = world.client.get(f"/v1/jobs/{job_id}/events", params={"limit": 1000}, headers=world.auth("a")).json()
    assert not answer["has_more"]
    return list(answer["data"])


def check_history(history: list[dict[str, Any]], final: str) -> None:
    """Positions 1..n, engine records each once and in order, and one final state event, last."""
    assert [e["position"] for e in history] == list(range(1, len(history) + 1))
    seqs = [e["seq"] for e in history if e["kind"] not in ("state", "attempt")]
    states = [e["data"]["state"] for e in history if e["kind"] == "state"]
    assert states.count(final) == 1 and states[-1] == final and history[-1]["kind"] == "state"
    assert None not in seqs and len(seqs) == len(set(seqs)) and seqs == sorted(seqs)


@pytest.fixture(scope="module")
def cluster_world(ray_head: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[World, dict[str, str]]]:
    tmp = tmp_path_factory.mktemp("service-ray")
    world = make_world(f"sqlite:///{tmp / 'service.db'}", tmp / "data", engine_settings={"ray_address": ray_head,
                       "events_flush_seconds": 1.0}, dispatcher=True, poll_seconds=0.5)  # fmt: skip
    with world.client:
        c = world.client
        bad = DATA + b"\n".join(b'{"messages": "not a list %d"}' % i for i in range(8)) + b"\n"
        for path, body in (("data/quickstart.jsonl", DATA), ("data/bad.jsonl", bad)):
            up = c.put("/v1/datasets/upload", params={"path": path}, content=body, headers=world.auth("a"))
            assert up.status_code == 201, up.text
        jobs = {}
        for name, text in (("refused", QUICKSTART.replace("data/quickstart.jsonl", "data/bad.jsonl")),
                           ("e2e", QUICKSTART), ("cancel", slow_recipe())):  # fmt: skip
            made = c.post(
                "/v1/jobs", content=text.encode(), headers={**world.auth("a"), "Content-Type": "application/yaml"}
            )
            assert made.status_code == 201, made.text
            jobs[name] = made.json()["id"]
        bench = c.post("/v1/ops/benchmarks", json=BENCHMARK, headers=world.auth("ops"))
        assert bench.status_code == 201, bench.text
        jobs["benchmark"] = bench.json()["id"]
        yield world, jobs
    world.svc.db.kw["bind"].dispose()


def test_a_refused_dataset_fails_the_job_before_any_gpu_with_every_located_problem(cluster_world) -> None:
    world, jobs = cluster_world
    job = wait_for(world, jobs["refused"], lambda j: j["state"] in FINAL)
    assert job["state"] == "failed" and job["reason"] == "tenant_error"
    assert job["started_at"] is None  # never ran: no worker, no GPU
    lines = {i["line"] for i in job["error"]["issues"] if i.get("file") == "data/bad.jsonl"}
    first_bad = DATA.count(b"\n") + 1
    assert lines >= set(range(first_bad, first_bad + 8)), job["error"]
    history = events(world, jobs["refused"])
    check_history(history, "failed")
    assert "running" not in [e["data"].get("state") for e in history]


def test_a_job_runs_on_ray_streams_every_step_and_its_archive_verifies(cluster_world, tmp_path: Path) -> None:
    from finetune.archive.verify import verify_archive

    world, jobs = cluster_world
    job_id = jobs["e2e"]
    received: list[dict[str, Any]] = []
    with world.client.stream("GET", f"/v1/jobs/{job_id}/events/stream", headers=world.auth("a")) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        for line in stream.iter_lines():  # the stream ends after the job's final event
            if line.startswith("data: "):
                received.append(json.loads(line[6:]))
    job = wait_for(world, job_id, lambda j: j["state"] in FINAL)
    assert job["state"] == "succeeded", job
    assert received == events(world, job_id)
    check_history(received, "succeeded")
    steps = [e["data"]["step"] for e in received if e["kind"] == "step"]
    assert steps == list(range(1, job["total_steps"] + 1)) and job["step"] == job["total_steps"]
    kinds = [e["kind"] for e in received]
    assert kinds.index("start") < kinds.index("step") and "end" in kinds and "checkpoint" in kinds
    metrics = world.client.get(f"/v1/jobs/{job_id}/metrics", headers=world.auth("a")).json()["points"]
    assert [p["step"] for p in metrics if p["loss"] is not None] == steps
    assert all(p["tokens_per_s_per_gpu"] > 0 for p in metrics if p["loss"] is not None)
    report = world.client.get(f"/v1/jobs/{job_id}/data-report", headers=world.auth("a"))
    assert report.status_code == 200 and report.json()
    archive = world.client.get(f"/v1/jobs/{job_id}/archive", headers=world.auth("a"))
    assert archive.status_code == 200
    path = tmp_path / "model.tar"
    path.write_bytes(archive.content)
    verified = verify_archive(path, key=world.svc.engine.signer().public, load=True)
    assert verified.ok, verified.as_dict()
    part = world.client.get(f"/v1/jobs/{job_id}/archive", headers={**world.auth("a"), "Range": "bytes=100-199"})
    assert part.status_code == 206 and part.content == archive.content[100:200]
    assert world.client.get(f"/v1/jobs/{job_id}/archive", headers=world.auth("b")).status_code == 404


def test_cancel_stops_the_workers_within_seconds_and_keeps_the_checkpoints(cluster_world) -> None:
    world, jobs = cluster_world
    job_id = jobs["cancel"]
    wait_for(world, job_id, lambda j: j["state"] == "running" and j["step"] >= 20)
    wait_for(world, job_id, lambda j: bool(world.client.get(f"/v1/jobs/{job_id}/checkpoints",
                                                            headers=world.auth("a")).json()))  # fmt: skip
    asked = time.monotonic()
    answer = world.client.post(f"/v1/jobs/{job_id}/cancel", headers=world.auth("a"))
    assert answer.status_code == 202
    job = wait_for(world, job_id, lambda j: j["state"] in FINAL, timeout=60)
    took = time.monotonic() - asked
    assert job["state"] == "cancelled" and job["reason"] == "cancelled", job
    assert job["step"] < job["total_steps"]
    assert took < 45, f"cancelled after {took:.1f} s"
    dispatcher = world.svc.dispatcher
    assert dispatcher is not None
    ray_job = dispatcher.cluster.status(f"{job_id}-1")
    assert ray_job is not None and ray_job.status == "STOPPED"
    kept = world.client.get(f"/v1/jobs/{job_id}/checkpoints", headers=world.auth("a")).json()
    assert kept and world.bucket("a").exists(f"jobs/{job_id}/checkpoints/{kept[-1]['name']}/COMMITTED.json")
    check_history(events(world, job_id), "cancelled")


def test_ops_benchmark_throughput_per_gpu_on_the_cluster(cluster_world) -> None:
    from finetune.service.models import Job

    world, jobs = cluster_world
    c = world.client
    assert c.post("/v1/ops/benchmarks", json=BENCHMARK, headers=world.auth("a")).status_code == 403
    assert c.post("/v1/ops/benchmarks", json={**BENCHMARK, "gpus": 99}, headers=world.auth("ops")).status_code == 422
    assert c.post("/v1/ops/benchmarks", json={**BENCHMARK, "runs": ["x; rm -rf /"]},
                  headers=world.auth("ops")).status_code == 422  # fmt: skip
    run_id = jobs["benchmark"]
    deadline = time.monotonic() + 300
    while (run := c.get(f"/v1/ops/benchmarks/{run_id}", headers=world.auth("ops")).json())["state"] in (
        "queued", "running"
    ):  # fmt: skip
        assert time.monotonic() < deadline, run
        time.sleep(1)
    assert run["state"] == "succeeded", run
    assert {row["system"] for row in run["per_gpu"]} == {"finetune", "hf-trainer"}
    assert all(row["gpu"] == 0 and row["tokens_per_s_per_gpu"] > 0 and row["device"] for row in run["per_gpu"])
    shown = c.get("/v1/ops/throughput", headers=world.auth("ops")).json()
    assert {r["benchmark_id"] for r in shown["benchmarked"]} == {run_id}
    assert c.get("/v1/ops/throughput", headers=world.auth("b")).status_code == 403
    with world.svc.db() as session:  # only the tenant's own three jobs: the benchmark is no one's
        assert session.query(Job).count() == 3
