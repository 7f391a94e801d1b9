"""The service killed (SIGKILL) while its job is queued, while it validates and while it runs, and
the job's Ray driver killed while it trains: the job still succeeds, once, with no event lost or
repeated. The service runs as its own process (uvicorn), on PostgreSQL, against a real Ray cluster.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.service.conftest import _free_port, make_world
from tests.service.test_jobs_on_ray import DATA, QUICKSTART, check_history

pytestmark = pytest.mark.integration


class ServiceProcess:
    """``uvicorn finetune.service.app:create_app`` in its own process group, started and killed at will."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env, self.log = env, log
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self, **extra: str) -> None:
        command = [sys.executable, "-m", "uvicorn", "--factory", "finetune.service.app:create_app",
                   "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning"]  # fmt: skip
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(command, env={**self.env, **extra}, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the service did not start: {self.log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.3)

    def kill(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.proc = None


@pytest.fixture
def service(ray_head: str, postgres_url: str, tmp_path: Path) -> Iterator[tuple[ServiceProcess, Any, str]]:
    world = make_world(postgres_url, tmp_path / "data")  # the database and tenants, made in-process
    with world.client:
        up = world.client.put("/v1/datasets/upload", params={"path": "data/quickstart.jsonl"}, content=DATA,
                              headers=world.auth("a"))  # fmt: skip
        assert up.status_code == 201, up.text
    world.svc.db.kw["bind"].dispose()
    env = {**os.environ, "FINETUNE_DATA_DIR": str(tmp_path / "data"), "FINETUNE_SERVICE_DATABASE_URL": postgres_url,
           "FINETUNE_RAY_ADDRESS": ray_head, "FINETUNE_SERVICE_POLL_SECONDS": "0.5",
           "FINETUNE_EVENTS_FLUSH_SECONDS": "1"}  # fmt: skip
    env.pop("RAY_ADDRESS", None)
    proc = ServiceProcess(env, tmp_path / "service.log")
    try:
        yield proc, world, ray_head
    finally:
        if proc.proc is not None:
            proc.kill()


def _get(proc: ServiceProcess, world: Any, path: str) -> Any:
    answer = httpx.get(f"{proc.url}{path}", headers=world.auth("a"), timeout=10)
    assert answer.status_code == 200, answer.text
    return answer.json()


def _until(proc: ServiceProcess, world: Any, job_id: str, done: Callable[[Any], bool], timeout: float = 180) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        job = _get(proc, world, f"/v1/jobs/{job_id}")
        if done(job):
            return job
        if job["state"] in ("failed", "cancelled") or time.monotonic() > deadline:
            raise AssertionError(f"job {job_id}: {job}")
        time.sleep(0.25)


def test_a_job_survives_the_service_killed_at_every_stage_and_its_driver_killed(service) -> None:
    from ray.job_submission import JobSubmissionClient

    proc, world, ray = service
    recipe = QUICKSTART.replace("epochs: 10", "epochs: 30").replace("micro_batch_size: 4", "micro_batch_size: 1")
    recipe = recipe.replace("  seed: 42", "  seed: 42\n  save_every_steps: 20")

    proc.start(FINETUNE_SERVICE_GPU_CAPACITY="0")  # no GPU free: the job waits in the queue
    submit = {**world.auth("a"), "Content-Type": "application/yaml", "Idempotency-Key": "once"}
    made = httpx.post(f"{proc.url}/v1/jobs", content=recipe.encode(), timeout=30, headers=submit)
    assert made.status_code == 201, made.text
    job_id = made.json()["id"]
    time.sleep(1.5)
    assert _get(proc, world, f"/v1/jobs/{job_id}")["state"] == "queued"
    proc.kill()  # 1: killed while the job is queued

    proc.start()
    _until(proc, world, job_id, lambda j: j["state"] == "validating")
    proc.kill()  # 2: killed while the job validates (its driver prepares the data on the cluster)

    proc.start()
    _until(proc, world, job_id, lambda j: j["state"] == "running" and j["step"] >= 25)
    _until(proc, world, job_id, lambda j: bool(_get(proc, world, f"/v1/jobs/{job_id}/checkpoints")))
    client = JobSubmissionClient(ray)
    driver = client.get_job_info(f"{job_id}-1").driver_info
    assert driver is not None and driver.pid
    os.kill(int(driver.pid), signal.SIGKILL)  # 3: the Ray job's driver dies while it trains
    _until(proc, world, job_id, lambda j: j["attempt"] == 2 and j["state"] == "running" and j["step"] > 0)
    proc.kill()  # 4: killed while the job runs (its second attempt)

    proc.start()
    job = _until(proc, world, job_id, lambda j: j["state"] == "succeeded", timeout=240)
    assert job["attempt"] == 2 and job["step"] == job["total_steps"]
    history = _get(proc, world, f"/v1/jobs/{job_id}/events?limit=1000")
    assert not history["has_more"]
    check_history(history["data"], "succeeded")
    kinds = [e["kind"] for e in history["data"]]
    assert kinds.count("attempt") == 1 and "resume" in kinds
    resumed = next(e for e in history["data"] if e["kind"] == "resume")
    assert resumed["attempt"] == 2 and resumed["data"]["step"] >= 20
    assert client.get_job_info(f"{job_id}-1").status == "FAILED"
    assert client.get_job_info(f"{job_id}-2").status == "SUCCEEDED"
    again = httpx.post(f"{proc.url}/v1/jobs", content=recipe.encode(), timeout=30, headers=submit)
    assert again.status_code == 200 and again.json()["id"] == job_id
