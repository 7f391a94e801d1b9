"""The Ray cluster as the dispatcher sees it: Ray jobs by submission id, and how many GPUs there are.

Submissions go through Ray's job API (the dashboard's HTTP server), so the service holds no Ray
connection: a killed service leaves its jobs running, and a restarted one finds them by id. On
embedded defaults, :func:`ensure_local_head` starts a local head (with its dashboard) that outlives
the service process, for the same reason.
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.errors import FinetuneError
from finetune.train.cluster_job import ENV, ClusterJob

logger = logging.getLogger(__name__)

#: Ray's job states, as its API names them.
PENDING, RUNNING, STOPPED, SUCCEEDED, FAILED = "PENDING", "RUNNING", "STOPPED", "SUCCEEDED", "FAILED"


class ClusterError(FinetuneError):
    """The cluster cannot be reached or refused a request."""

    fault = "transient"


@dataclass(frozen=True)
class RayJob:
    status: str
    exit_code: int | None
    message: str


def dashboard_up(address: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{address.rstrip('/')}/api/version", timeout=timeout) as answer:
            return bool(answer.status == 200)
    except (urllib.error.URLError, OSError, ValueError):
        return False


def ensure_local_head(*, port: int, dashboard_port: int, num_cpus: int | None, state_dir: Path,
                      wait: float = 90.0) -> str:  # fmt: skip
    """The job-submission address of a local Ray head, started (detached) if none answers there.

    Raises:
        ClusterError: The head did not come up within ``wait`` seconds.
    """
    address = f"http://127.0.0.1:{dashboard_port}"
    if dashboard_up(address):
        return address
    state_dir.mkdir(parents=True, exist_ok=True)
    ray = Path(sys.executable).with_name("ray")
    command = [str(ray) if ray.exists() else "ray", "start", "--head", f"--port={port}",
               f"--dashboard-port={dashboard_port}", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
               "--disable-usage-stats"]  # fmt: skip
    if num_cpus is not None:
        command.append(f"--num-cpus={num_cpus}")
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
    env.pop("RAY_ADDRESS", None)
    logger.info("starting a local Ray head: %s", shlex.join(command))
    with open(state_dir / "ray-start.log", "ab") as log:
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                              timeout=wait, check=False)  # fmt: skip
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if dashboard_up(address):
            return address
        time.sleep(0.5)
    raise ClusterError(f"the local Ray head did not start (exit {done.returncode}); see {state_dir / 'ray-start.log'}")


class RayCluster:
    """Ray jobs through the job-submission API at ``address`` (``http://head:8265``)."""

    def __init__(self, address: str, *, python: str | None = None) -> None:
        from ray.job_submission import JobSubmissionClient

        self.address = address
        self.python = python or sys.executable
        try:
            self.client = JobSubmissionClient(address)
        except Exception as exc:  # noqa: BLE001 - Ray raises plain errors for an unreachable head
            raise ClusterError(f"cannot reach the Ray cluster at {address}: {exc}") from exc

    def submit(self, submission_id: str, job: ClusterJob) -> None:
        """Start the job's driver as a Ray job named ``submission_id``; a second submission of the same
        id is refused by Ray and ignored here (the first one runs)."""
        # No secret travels with a job (Ray shows a job's environment to whoever can see the
        # cluster): the cluster's processes have the signing key and storage credentials of their own.
        env = {ENV: job.model_dump_json()}
        for name in ("RAY_AUTH_MODE", "OMP_NUM_THREADS"):
            if name in os.environ:
                env[name] = os.environ[name]
        try:
            self.client.submit_job(
                entrypoint=f"{shlex.quote(self.python)} -m workers.cluster_job",
                submission_id=submission_id,
                runtime_env={"env_vars": env},
                metadata={"finetune_job": job.job_id, "attempt": str(job.attempt)},
                entrypoint_num_cpus=0,
            )
        except RuntimeError as exc:
            if "already exists" in str(exc) or "already been used" in str(exc):
                logger.info("Ray job %s exists already: watching it", submission_id)
                return
            raise ClusterError(f"the cluster refused job {submission_id}: {exc}") from exc
        except Exception as exc:  # noqa: BLE001 - connection errors of requests
            raise ClusterError(f"cannot submit job {submission_id}: {exc}") from exc

    def submit_benchmark(self, submission_id: str, request: dict[str, Any]) -> None:
        """Start the ops' throughput benchmark (:mod:`workers.benchmark`) as a Ray job."""
        import json

        from finetune.service.benchmarks import ENV as BENCHMARK

        env = {BENCHMARK: json.dumps(request)}
        if "RAY_AUTH_MODE" in os.environ:
            env["RAY_AUTH_MODE"] = os.environ["RAY_AUTH_MODE"]
        try:
            self.client.submit_job(entrypoint=f"{shlex.quote(self.python)} -m workers.benchmark",
                                   submission_id=submission_id, runtime_env={"env_vars": env},
                                   metadata={"finetune_benchmark": submission_id}, entrypoint_num_cpus=0)  # fmt: skip
        except RuntimeError as exc:
            if "already exists" in str(exc) or "already been used" in str(exc):
                return
            raise ClusterError(f"the cluster refused benchmark {submission_id}: {exc}") from exc
        except Exception as exc:  # noqa: BLE001
            raise ClusterError(f"cannot submit benchmark {submission_id}: {exc}") from exc

    def logs(self, submission_id: str) -> str:
        """The driver's log (benchmarks only: a tenant job's log may hold the tenant's content)."""
        try:
            return str(self.client.get_job_logs(submission_id))
        except Exception as exc:  # noqa: BLE001
            raise ClusterError(f"cannot read the log of {submission_id}: {exc}") from exc

    def status(self, submission_id: str) -> RayJob | None:
        """The Ray job's state, or None when the cluster does not know it."""
        try:
            info = self.client.get_job_info(submission_id)
        except RuntimeError as exc:
            if "does not exist" in str(exc) or "404" in str(exc) or "not found" in str(exc).lower():
                return None
            raise ClusterError(f"cannot read the state of job {submission_id}: {exc}") from exc
        except Exception as exc:  # noqa: BLE001
            raise ClusterError(f"cannot read the state of job {submission_id}: {exc}") from exc
        return RayJob(str(getattr(info.status, "value", info.status)), info.driver_exit_code, info.message or "")

    def stop(self, submission_id: str) -> None:
        try:
            self.client.stop_job(submission_id)
        except Exception as exc:  # noqa: BLE001 - a job that ended meanwhile
            logger.info("stopping %s: %s", submission_id, exc)

    def gpus(self) -> int:
        """GPUs in the cluster now (0 on a cluster of CPUs)."""
        from ray.util.state import list_nodes

        try:
            nodes: list[Any] = list_nodes(address=self.address, limit=10_000, raise_on_missing_output=False)
        except Exception as exc:  # noqa: BLE001
            raise ClusterError(f"cannot list the cluster's nodes: {exc}") from exc
        total = 0.0
        for node in nodes:
            if getattr(node, "state", "ALIVE") != "ALIVE":
                continue
            resources = getattr(node, "resources_total", None) or {}
            total += float(resources.get("GPU", 0))
        return int(total)
