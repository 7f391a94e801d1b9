"""The dispatcher: admits queued jobs when the cluster has their GPUs, runs each attempt as a Ray
job, brings the engine's records into the database, and settles every job with the cluster.

It keeps no state of its own: everything it knows is in the database and on the cluster, so a
service killed at any moment and started again picks up where it was. Each tick, for every job it
is responsible for:

- queued: admitted first come first served while GPUs are free; a tenant at its grant's limit of
  GPUs held at once is passed over without holding up other tenants. Admission records the
  attempt's Ray submission id (``<job>-<attempt>``) before anything is submitted.
- validating / running: submitted if the submission was not acknowledged (Ray refuses a second job
  of the same id, so a retried submit cannot run it twice); the engine's new records ingested; a
  cancel request passed on; then settled with what the cluster says: still going (keep watching),
  succeeded or cancelled (recorded, once), failed by the tenant's data or recipe (failed, with the
  engine's located issues), lost or failed otherwise (the next attempt, which resumes from the
  newest checkpoint in the bucket, up to ``max_attempts``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from finetune.events import read_events
from finetune.service.cluster import FAILED, STOPPED, SUCCEEDED, ClusterError, RayCluster, RayJob, ensure_local_head
from finetune.service.history import add_events, transition
from finetune.service.ingest import ingest, job_prefix
from finetune.service.models import BenchmarkRun, Grant, Job, utcnow
from finetune.service.scope import Service
from finetune.storage import Bucket
from finetune.train.cluster_job import EXIT_PREEMPTED, EXIT_TENANT, ClusterJob

logger = logging.getLogger(__name__)

ACTIVE = ("validating", "running")
CAPACITY_TTL = 30.0


def submission_id(job_id: str, attempt: int) -> str:
    return f"{job_id}-{attempt}"


class Dispatcher:
    def __init__(self, svc: Service, cluster: RayCluster | None = None) -> None:
        self.svc = svc
        self._cluster = cluster
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._beat = time.monotonic()
        self._capacity: tuple[float, int] | None = None
        self.last_error: str | None = None

    # ------------------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="dispatcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def wake(self) -> None:
        """Look at the jobs now rather than at the next tick (a job was created or cancelled)."""
        self._wake.set()

    def alive(self) -> bool:
        interval = self.svc.settings.poll_seconds
        return (
            self._thread is not None
            and self._thread.is_alive()
            and time.monotonic() - self._beat < max(60.0, 20 * interval)
        )

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
                self.last_error = None
            except ClusterError as exc:
                self.last_error = str(exc)
                logger.warning("the cluster: %s", exc)
                if not self.svc.engine.ray_address:  # our own local head died: start it again next tick
                    self._cluster = None
            except Exception as exc:  # noqa: BLE001 - one bad tick must not stop the dispatcher
                self.last_error = f"{type(exc).__name__}: {exc}"
                logger.exception("dispatcher tick failed")
            self._beat = time.monotonic()
            self._wake.wait(self.svc.settings.poll_seconds)
            self._wake.clear()

    # -------------------------------------------------------------------------------- cluster
    @property
    def cluster(self) -> RayCluster:
        if self._cluster is None:
            settings, engine = self.svc.settings, self.svc.engine
            address = engine.ray_address
            if not address:
                address = ensure_local_head(port=settings.ray_port, dashboard_port=settings.ray_dashboard_port,
                                            num_cpus=settings.ray_num_cpus,
                                            state_dir=settings.ray_state_dir(engine))  # fmt: skip
            self._cluster = RayCluster(address, python=settings.worker_python)
        return self._cluster

    def capacity(self) -> int:
        """GPUs the dispatcher may hand out: the setting, else the cluster's (CPU slots on a cluster
        without GPUs)."""
        settings = self.svc.settings
        if settings.gpu_capacity is not None:
            return settings.gpu_capacity
        now = time.monotonic()
        if self._capacity is None or now - self._capacity[0] > CAPACITY_TTL:
            gpus = self.cluster.gpus()
            self._capacity = (now, gpus if gpus > 0 else settings.cpu_slots)
        return self._capacity[1]

    # ----------------------------------------------------------------------------------- tick
    def tick(self) -> None:
        self.admit()
        self.admit_benchmarks()
        with self.svc.db() as session:
            ids = session.scalars(select(Job.id).where(Job.state.in_(ACTIVE)).order_by(Job.id)).all()
            runs = session.scalars(select(BenchmarkRun.id).where(BenchmarkRun.state == "running")).all()
        for job_id in ids:
            try:
                self.settle(job_id)
            except ClusterError:
                raise  # the cluster is unreachable: tried again at the next tick
            except Exception:  # noqa: BLE001 - one job's trouble (its bucket, say) must not hold up the others
                logger.exception("job %s could not be settled this tick", job_id)
        for run_id in runs:
            self.settle_benchmark(run_id)

    def busy(self, session: Session) -> int:
        """GPUs held now: by tenants' jobs and by the ops' benchmarks."""
        jobs = session.scalar(select(func.coalesce(func.sum(Job.gpus), 0)).where(Job.state.in_(ACTIVE)))
        runs = session.scalar(
            select(func.coalesce(func.sum(BenchmarkRun.gpus), 0)).where(BenchmarkRun.state == "running")
        )
        return int(jobs or 0) + int(runs or 0)

    def admit(self) -> None:
        """Admit queued jobs, first come first served, while GPUs are free."""
        with self.svc.db() as session:
            queued = session.scalars(select(Job).where(Job.state == "queued").order_by(Job.id).limit(1000)).all()
            if not queued:
                return
            capacity = self.capacity()
            busy = self.busy(session)
            held: dict[str, int] = defaultdict(int)
            for tenant, gpus in session.execute(
                select(Job.tenant_id, func.sum(Job.gpus)).where(Job.state.in_(ACTIVE)).group_by(Job.tenant_id)
            ).all():
                held[tenant] = int(gpus or 0)
            for job in queued:
                grant = session.scalar(select(Grant).where(Grant.tenant_id == job.tenant_id,
                                                           Grant.term_id == job.term_id))  # fmt: skip
                if grant is None or held[job.tenant_id] + job.gpus > grant.gpus_held or job.gpus > capacity:
                    continue  # this tenant waits for its own jobs; others go on
                if busy + job.gpus > capacity:
                    break  # first come, first served: no job overtakes the one at the head
                if transition(session, job, "validating",
                              changes={"attempt": 1, "submission_id": submission_id(job.id, 1),
                                       "submitted_at": None}):  # fmt: skip
                    busy += job.gpus
                    held[job.tenant_id] += job.gpus
                session.commit()

    # --------------------------------------------------------------------------------- settle
    def bucket(self, session: Session, job: Job) -> tuple[Bucket, int]:
        grant = session.scalar(select(Grant).where(Grant.tenant_id == job.tenant_id, Grant.term_id == job.term_id))
        quota = grant.storage_bytes if grant is not None else self.svc.engine.quota_bytes
        engine = self.svc.engine.model_copy(update={"quota_bytes": quota})
        return Bucket.for_tenant(engine, job.tenant_id, job.term_id), quota

    def cluster_job(self, job: Job, bucket: Bucket, quota: int) -> ClusterJob:
        from finetune.jobstore import JobStore

        settings = self.svc.engine.for_workers()
        flush = min(float(settings["events_flush_seconds"]), self.svc.settings.events_flush_seconds)
        settings.update({"quota_bytes": quota, "events_flush_seconds": flush})
        settings.pop("ray_address", None)  # the driver joins the cluster Ray runs it on (its RAY_ADDRESS)
        store = JobStore(bucket, job_prefix(job.id), job.id)
        return ClusterJob(job_id=job.id, attempt=job.attempt, store=store.ref(), recipe=job.recipe, settings=settings)

    def settle(self, job_id: str) -> None:
        with self.svc.db() as session:
            job = session.get(Job, job_id)
            if job is None or job.state not in ACTIVE or job.submission_id is None:
                return
            bucket, quota = self.bucket(session, job)
            if job.submitted_at is None:
                if self.cluster.status(job.submission_id) is None:
                    self.cluster.submit(job.submission_id, self.cluster_job(job, bucket, quota))
                job.submitted_at = utcnow()
                session.commit()
                return
            ingest(session, job, bucket)
            if job.cancel_requested_at is not None:
                self.cluster.stop(job.submission_id)
            found = self.cluster.status(job.submission_id)
            if found is None:
                self.retry(session, job, "lost: the cluster no longer knows this attempt")
            elif found.status in (SUCCEEDED, STOPPED, FAILED):
                ingest(session, job, bucket)  # the driver's last records, before the final state
                self.finish(session, job, found, bucket)

    def finish(self, session: Session, job: Job, found: RayJob, bucket: Bucket) -> None:
        if job.cancel_requested_at is not None:
            transition(session, job, "cancelled", reason="cancelled")
        elif found.status == SUCCEEDED:
            if job.state == "validating":  # a driver that ended before its workers started
                transition(session, job, "running")
            transition(session, job, "succeeded", reason="finished")
        elif found.status == FAILED and found.exit_code == EXIT_TENANT:
            transition(session, job, "failed", reason="tenant_error", error=self.recorded_error(job, bucket))
        elif found.status == FAILED and found.exit_code == EXIT_PREEMPTED:
            self.retry(session, job, "preempted: stopped after a checkpoint")
        else:
            why = "stopped by the cluster" if found.status == STOPPED else f"the driver failed (exit {found.exit_code})"
            self.retry(session, job, f"{why}: {found.message[:300]}", error=self.recorded_error(job, bucket))
        session.commit()

    def recorded_error(self, job: Job, bucket: Bucket) -> dict[str, Any] | None:
        """The last failure the attempt recorded (with its located issues), if any."""
        failures = [e for e in read_events(bucket, job_prefix(job.id)) if e.kind == "failure"]
        return failures[-1].error.model_dump(mode="json") if failures else None

    def retry(self, session: Session, job: Job, why: str, *, error: dict[str, Any] | None = None) -> None:
        """The next attempt of a job whose attempt was lost or failed for a reason not the tenant's,
        or the job failed when it has had its attempts."""
        if job.attempt >= self.svc.settings.max_attempts:
            failure = error or {"type": "AttemptsExhausted", "message": why, "fault": "platform"}
            transition(session, job, "failed", reason="attempts_exhausted", error=failure)
            session.commit()
            return
        attempt = job.attempt + 1
        job.attempt, job.submission_id, job.submitted_at = attempt, submission_id(job.id, attempt), None
        job.updated_at = utcnow()
        session.flush()
        add_events(session, job, [("attempt", {"attempt": attempt, "reason": why}, None, None)])
        session.commit()

    # ----------------------------------------------------------------------------- benchmarks
    def admit_benchmarks(self) -> None:
        """Start the ops' queued benchmarks, oldest first, on GPUs no tenant job waits for."""
        with self.svc.db() as session:
            runs = session.scalars(
                select(BenchmarkRun).where(BenchmarkRun.state == "queued").order_by(BenchmarkRun.id)
            ).all()
            if not runs:
                return
            waiting = session.scalar(select(func.count()).select_from(Job).where(Job.state == "queued")) or 0
            free = self.capacity() - self.busy(session)
            for run in runs:
                if waiting or run.gpus > free:
                    break  # tenants first; then first come first served
                run.state, run.started_at = "running", utcnow()
                run.submission_id = f"{run.id}-1"
                free -= run.gpus
            session.commit()

    def settle_benchmark(self, run_id: str) -> None:
        from finetune.service.benchmarks import parse_result
        from finetune.service.ingest import _clean

        with self.svc.db() as session:
            run = session.get(BenchmarkRun, run_id)
            if run is None or run.state != "running" or run.submission_id is None:
                return
            if run.submitted_at is None:
                if self.cluster.status(run.submission_id) is None:
                    self.cluster.submit_benchmark(run.submission_id, run.request)
                run.submitted_at = utcnow()
                session.commit()
                return
            found = self.cluster.status(run.submission_id)
            if found is None or found.status in (STOPPED, FAILED):
                run.state, run.finished_at = "failed", utcnow()
                run.error = found.message[:2000] if found else "lost: the cluster no longer knows this benchmark"
            elif found.status == SUCCEEDED:
                result = parse_result(self.cluster.logs(run.submission_id))
                run.finished_at = utcnow()
                if result is None:
                    run.state, run.error = "failed", "the benchmark printed no result"
                else:
                    run.state, run.result = "succeeded", _clean(result)
                    devices = {str((one.get("device") or {}).get("name")) for one in result}
                    run.device = ", ".join(sorted(devices))[:200]
            session.commit()
