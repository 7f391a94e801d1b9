"""What operators see: every tenant's jobs, the queue, GPUs busy and throughput per GPU; the
Prometheus scrape. No route here reads a dataset, a recipe, an event or a file of a tenant's."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.responses import Response
from sqlalchemy import func, select

from finetune.service.benchmarks import BenchmarkRequest, per_gpu_rows, script
from finetune.service.errors import ApiError, not_found
from finetune.service.ids import new_id
from finetune.service.jobs import ops_job_out
from finetune.service.models import STATES, BenchmarkRun, Job
from finetune.service.paging import After, Limit, page
from finetune.service.schemas import OpsJobOut, Page
from finetune.service.scope import Ops, OpsScope

router = APIRouter(tags=["ops"])

ACTIVE = ("validating", "running")


def capacity(scope: OpsScope) -> int | None:
    dispatcher = scope.svc.dispatcher
    return dispatcher.capacity() if dispatcher is not None else scope.svc.settings.gpu_capacity


def gpus_busy(scope: OpsScope) -> int:
    return int(scope.session.scalar(select(func.coalesce(func.sum(Job.gpus), 0)).where(Job.state.in_(ACTIVE))) or 0)


@router.get("/v1/ops/jobs", response_model=Page[OpsJobOut], summary="Every tenant's jobs (no content)")
def ops_jobs(scope: Ops, after: After = None, limit: Limit = 50, state: str | None = None,
             tenant_id: Annotated[str | None, Query(max_length=40)] = None) -> Page[OpsJobOut]:  # fmt: skip
    query = select(Job)
    if state is not None:
        query = query.where(Job.state == state)
    if tenant_id is not None:
        query = query.where(Job.tenant_id == tenant_id)
    return page(scope.session, query, Job.id, after, limit, ops_job_out)


@router.get("/v1/ops/queue", summary="The queue, first come first served, and the GPUs in use")
def ops_queue(scope: Ops) -> dict[str, Any]:
    queued = scope.session.scalars(select(Job).where(Job.state == "queued").order_by(Job.id).limit(1000)).all()
    counts = dict(scope.session.execute(select(Job.state, func.count()).group_by(Job.state)).all())
    return {
        "queued": [{"position": n, **ops_job_out(j).model_dump(mode="json")} for n, j in enumerate(queued, 1)],
        "jobs_by_state": {state: int(counts.get(state, 0)) for state in STATES},
        "gpus_busy": gpus_busy(scope),
        "gpu_capacity": capacity(scope),
    }


def throughput_rows(scope: OpsScope) -> list[dict[str, Any]]:
    """Live tokens/s per GPU of running jobs, by model and method."""
    rows = scope.session.execute(
        select(Job.model_id, Job.method, func.count(), func.avg(Job.tokens_per_s_per_gpu), func.sum(Job.gpus))
        .where(Job.state == "running", Job.tokens_per_s_per_gpu.is_not(None))
        .group_by(Job.model_id, Job.method)
        .order_by(Job.model_id, Job.method)
    ).all()
    return [{"model_id": m, "method": meth, "jobs": int(n), "gpus": int(g or 0), "tokens_per_s_per_gpu": float(avg)}
            for m, meth, n, avg, g in rows]  # fmt: skip


def benchmark_out(run: BenchmarkRun) -> dict[str, Any]:
    return {"id": run.id, "gpus": run.gpus, "request": run.request, "state": run.state, "device": run.device,
            "created_at": run.created_at.isoformat(), "started_at": run.started_at and run.started_at.isoformat(),
            "finished_at": run.finished_at and run.finished_at.isoformat(), "error": run.error,
            "per_gpu": per_gpu_rows(run.result) if run.result else []}  # fmt: skip


@router.post("/v1/ops/benchmarks", status_code=201, summary="Run the throughput benchmark on the cluster's GPUs")
def create_benchmark(scope: Ops, body: BenchmarkRequest) -> dict[str, Any]:
    """Our engine against the Hugging Face Trainer, on synthetic data, once per GPU asked for. It waits
    for GPUs no tenant job is waiting for, and charges no tenant."""
    if script() is None:
        raise ApiError(422, "the benchmark scripts are not installed with this service", code="unavailable")
    cap = capacity(scope)
    if cap is not None and body.gpus > cap:
        raise ApiError(422, f"asks for {body.gpus} GPUs; the cluster has {cap}", param="gpus")
    run = BenchmarkRun(id=new_id("bench"), gpus=body.gpus, request=body.model_dump(mode="json"), state="queued")
    scope.session.add(run)
    scope.session.commit()
    if scope.svc.dispatcher is not None:
        scope.svc.dispatcher.wake()
    return benchmark_out(run)


@router.get("/v1/ops/benchmarks", summary="The benchmarks run, newest first")
def list_benchmarks(scope: Ops, limit: Limit = 20) -> list[dict[str, Any]]:
    runs = scope.session.scalars(select(BenchmarkRun).order_by(BenchmarkRun.id.desc()).limit(limit)).all()
    return [benchmark_out(r) for r in runs]


@router.get("/v1/ops/benchmarks/{benchmark_id}", summary="One benchmark and its figures per GPU")
def get_benchmark(scope: Ops, benchmark_id: str) -> dict[str, Any]:
    run = scope.session.get(BenchmarkRun, benchmark_id)
    if run is None:
        raise not_found("benchmark", benchmark_id)
    return benchmark_out(run)


@router.get("/v1/ops/throughput", summary="Tokens/s per GPU: live by model and method, and as benchmarked")
def ops_throughput(scope: Ops) -> dict[str, Any]:
    latest: dict[tuple[Any, ...], dict[str, Any]] = {}
    done = scope.session.scalars(
        select(BenchmarkRun).where(BenchmarkRun.state == "succeeded").order_by(BenchmarkRun.id.desc()).limit(50)
    ).all()
    for run in done:  # the newest figure of each device, system, model and method
        for row in per_gpu_rows(run.result or []):
            key = (row["device"], row["system"], row["model_id"], row["method"], row["size"])
            latest.setdefault(key, {**row, "benchmark_id": run.id, "finished_at": run.finished_at})
    return {"live": throughput_rows(scope), "benchmarked": list(latest.values())}


@router.get("/metrics", summary="Prometheus metrics (ops key)", response_class=Response,
            responses={200: {"content": {"text/plain; version=0.0.4": {}}}})  # fmt: skip
def prometheus(scope: Ops) -> Response:
    from prometheus_client import CollectorRegistry, Gauge, generate_latest

    registry = CollectorRegistry()
    by_state = Gauge("finetune_jobs", "Jobs by state", ["state"], registry=registry)
    counts = dict(scope.session.execute(select(Job.state, func.count()).group_by(Job.state)).all())
    for state in STATES:
        by_state.labels(state).set(int(counts.get(state, 0)))
    Gauge("finetune_queue_length", "Jobs waiting for GPUs", registry=registry).set(int(counts.get("queued", 0)))
    Gauge("finetune_gpus_busy", "GPUs held by jobs", registry=registry).set(gpus_busy(scope))
    cap = capacity(scope)
    if cap is not None:
        Gauge("finetune_gpu_capacity", "GPUs the dispatcher may hand out", registry=registry).set(cap)
    tps = Gauge("finetune_tokens_per_second_per_gpu", "Live training throughput per GPU", ["model", "method"],
                registry=registry)  # fmt: skip
    for row in throughput_rows(scope):
        tps.labels(row["model_id"], row["method"]).set(row["tokens_per_s_per_gpu"])
    return Response(generate_latest(registry), media_type="text/plain; version=0.0.4; charset=utf-8")
