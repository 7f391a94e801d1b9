"""The ops' throughput benchmark through the service, as a cluster job: recorded per GPU with the
device, shown beside the live figures; tenants cannot reach it and are charged nothing."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from finetune.service.models import Job
from tests.service.conftest import make_world

pytestmark = pytest.mark.integration


def test_ops_benchmark_throughput_per_gpu_on_the_cluster(ray_head: str, tmp_path: Path) -> None:
    engine = {"ray_address": ray_head}
    world = make_world(f"sqlite:///{tmp_path / 'service.db'}", tmp_path / "data", engine_settings=engine,
                       dispatcher=True, poll_seconds=0.5)  # fmt: skip
    request = {"gpus": 1, "runs": ["smollm2-135m-instruct:lora"], "seq_len": 256, "warmup": 1, "steps": 2}
    with world.client:
        c = world.client
        assert c.post("/v1/ops/benchmarks", json=request, headers=world.auth("a")).status_code == 403
        assert c.post("/v1/ops/benchmarks", json={**request, "gpus": 99}, headers=world.auth("ops")).status_code == 422
        assert c.post("/v1/ops/benchmarks", json={**request, "runs": ["x; rm -rf /"]},
                      headers=world.auth("ops")).status_code == 422  # fmt: skip
        made = c.post("/v1/ops/benchmarks", json=request, headers=world.auth("ops"))
        assert made.status_code == 201, made.text
        run_id = made.json()["id"]
        deadline = time.monotonic() + 240
        while (run := c.get(f"/v1/ops/benchmarks/{run_id}", headers=world.auth("ops")).json())["state"] in (
            "queued", "running"
        ):  # fmt: skip
            assert time.monotonic() < deadline, run
            time.sleep(1)
        assert run["state"] == "succeeded", run
        systems = {row["system"] for row in run["per_gpu"]}
        assert systems == {"finetune", "hf-trainer"} and all(row["gpu"] == 0 for row in run["per_gpu"])
        assert all(row["tokens_per_s_per_gpu"] > 0 and row["device"] for row in run["per_gpu"])
        shown = c.get("/v1/ops/throughput", headers=world.auth("ops")).json()
        assert {r["benchmark_id"] for r in shown["benchmarked"]} == {run_id} and shown["live"] == []
        assert c.get("/v1/ops/throughput", headers=world.auth("b")).status_code == 403
        with world.svc.db() as session:
            assert session.query(Job).count() == 0  # no tenant job, no tenant charged
    world.svc.db.kw["bind"].dispose()
