"""Load on the job service: many tenants' clients listing, reading and streaming over a large history.

A database of ``--tenants`` tenants, ``--jobs`` jobs and ``--events`` events is built with bulk
inserts; the plan and time of each query a request makes are recorded on it. Then, for each
``--app``, the service is started for real (uvicorn, one process, dispatcher off) on loopback;
one client alone measures what each operation costs the server, then ``--clients`` concurrent
clients, each a random tenant with its own key and connection, run a mix of list jobs, get a job,
list events and read an event stream for ``--seconds``. Meanwhile one writer process appends
``--write-rate`` step events a second to a running job (``history.add_events``, one transaction
each, as the dispatcher would) and ``--hot-streamers`` of the clients follow that job's stream,
measuring each event's delivery delay (received minus the write time held in its data).

    # the issue's sizes, the service of this checkout:
    python benchmarks/service_load.py --db both
    # two commits of the service on the same database, clients pausing ~1 s between requests:
    python benchmarks/service_load.py --db both --events 200000 --think 1 --tag think1s \\
        --app service@b9fb1e6 --app service@a37bb6c
    # a smoke run:
    python benchmarks/service_load.py --db sqlite --tenants 3 --jobs 30 --events 600 --clients 4 --seconds 2

``--app NAME@COMMIT`` runs the service's code at that commit (a snapshot: others may be editing this
checkout meanwhile); ``--app patched`` is the service with the changes this benchmark proposed
patched in (:func:`patched_app`). Prints a table per database and writes
benchmarks/results/service-load-<db>[-<tag>]-<date>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing as mp
import os
import platform
import random
import re
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import Engine, event, func, insert, select, text, update

from finetune.hardware import cpu_name
from finetune.service import admin
from finetune.service.db import make_engine, migrate, sessions, transaction
from finetune.service.history import add_events
from finetune.service.ids import new_id
from finetune.service.models import Event, Job

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
ROOT = Path(__file__).resolve().parents[1]
POSTGRES = os.environ.get("FINETUNE_BENCH_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
TERM = "bench-term"
APPS = {"service": "finetune.service.app:create_app", "patched": "service_load:patched_app"}
#: Share of jobs in each state (the rest of a long-lived service's history is finished work).
STATE_MIX = {"succeeded": 0.62, "failed": 0.10, "cancelled": 0.05, "running": 0.08, "validating": 0.03, "queued": 0.12}
WEIGHTS = {"list_jobs": 0.30, "get_job": 0.30, "list_events": 0.30, "stream": 0.10}
OPERATIONS = ("list_jobs", "get_job", "list_events", "stream")
RECIPES = ("lora_chat_sft.yaml", "full_sft_zero3.yaml", "qlora.yaml")
REASONS = {"succeeded": "succeeded", "cancelled": "cancelled", "failed": "training_error"}


@dataclass
class JobInfo:
    id: str
    tenant: int
    state: str
    events: int  # its positions are 1..events


@dataclass
class Built:
    tenant_ids: list[str]
    keys: list[str]  # tenant index -> clear key
    jobs_of: list[list[JobInfo]]  # tenant index -> its jobs
    hot: JobInfo
    seconds: dict[str, float] = field(default_factory=dict)


# ------------------------------------------------------------------------------------- build


def _recipes() -> list[dict[str, Any]]:
    import yaml

    from finetune.recipe import Recipe

    texts = [(ROOT / "recipes" / name).read_text(encoding="utf-8") for name in RECIPES]
    return [Recipe.model_validate(yaml.safe_load(t)).model_dump(mode="json") for t in texts]


def _event_counts(states: list[str], total: int, rng: random.Random) -> list[int]:
    """Events per job summing to ``total``: 1 for a queued job, 2 validating, long-tailed for the rest."""
    fixed = {"queued": 1, "validating": 2}
    counts = [fixed.get(s, 0) for s in states]
    rest = [i for i, s in enumerate(states) if s not in fixed]
    left = total - sum(counts)
    weights = [rng.lognormvariate(0.0, 1.0) for _ in rest]
    scale = sum(weights) or 1.0
    for i, w in zip(rest, weights, strict=True):
        counts[i] = max(6, int(left * w / scale))
    surplus = sum(counts) - total  # rounding and the minimum: take from (or give to) the longest
    order = sorted(rest, key=lambda i: -counts[i])
    for i in order:
        if surplus == 0:
            break
        take = min(surplus, counts[i] - 6) if surplus > 0 else surplus
        counts[i] -= take
        surplus -= take
    return counts


def _history(job: dict[str, Any], n: int, rng: random.Random) -> Iterator[dict[str, Any]]:
    """The job's ``n`` events: its state changes, and between them the engine's start, steps,
    evaluations and checkpoints with realistic payloads."""
    state, t0 = job["state"], job["created_at"]
    end = job["finished_at"] or datetime.now(UTC)
    span = max((end - t0).total_seconds(), 1.0)

    def row(pos: int, kind: str, data: dict[str, Any], seq: int | None) -> dict[str, Any]:
        when = t0 + timedelta(seconds=span * pos / (n + 1))
        return {
            "job_id": job["id"],
            "position": pos,
            "seq": seq,
            "attempt": job["attempt"],
            "kind": kind,
            "time": when,
            "data": data,
        }

    chain = [("queued", None), ("validating", "queued"), ("running", "validating")]
    for pos, (to, source) in enumerate(chain[: min(n, 3)], start=1):
        yield row(pos, "state", {"state": to, "from": source}, None)
    final = 1 if state in ("succeeded", "failed", "cancelled") else 0
    engine = n - 3 - final
    if engine <= 0:
        return
    total, loss0 = job["total_steps"], rng.uniform(1.6, 2.8)
    yield row(
        4,
        "start",
        {
            "seq": 1,
            "step": 0,
            "detail": "from scratch",
            "zero_stage": 2,
            "total_steps": total,
            "hardware": {"gpus": job["gpus"], "name": "NVIDIA H200"},
            "parameters": {"total": 8030261248, "trained": 41943040},
        },
        1,
    )
    for seq in range(2, engine + 1):
        step = seq - 1
        if step % 100 == 0:
            kind, data = "checkpoint", {"name": f"step-{step:08d}", "files": 7, "bytes": 167_772_160, "seconds": 3.1}
        elif step % 25 == 0:
            kind, data = (
                "eval",
                {"eval_loss": round(loss0 * 0.6 + rng.random() * 0.05, 4), "eval_ppl": 3.4, "eval_tokens": 204_800},
            )
        else:
            loss = loss0 * (0.55 + 0.45 * math.exp(-step / 300)) + rng.gauss(0, 0.03)
            kind, data = (
                "step",
                {
                    "epoch": round(step / max(total, 1) * 3, 4),
                    "lr": 2e-4 * min(1.0, step / 30),
                    "loss": round(loss, 4),
                    "trained_tokens": 131_072 * step,
                    "tokens": 131_072,
                    "grad_norm": round(rng.uniform(0.2, 1.5), 4),
                    "step_time": round(rng.uniform(1.1, 1.4), 3),
                    "tokens_per_s": round(rng.uniform(9.5e4, 1.1e5), 1),
                    "peak_memory": 61_203_283_968,
                },
            )
        yield row(seq + 3, kind, {"seq": seq, "step": step, **data}, seq)
    if final:
        data = {"state": state, "from": "running", "reason": REASONS[state]}
        if state == "failed":
            data["error"] = {"code": "training_error", "message": "loss became NaN at a step"}
        yield row(n, "state", data, None)


def _jobs(sizes: argparse.Namespace, rng: random.Random) -> list[dict[str, Any]]:
    recipes, now = _recipes(), datetime.now(UTC)
    states = rng.choices(list(STATE_MIX), weights=list(STATE_MIX.values()), k=sizes.jobs)
    states[0] = "running"  # the job the writer appends to (tenant 0's)
    created = sorted(now - timedelta(days=rng.uniform(0.01, 60)) for _ in range(sizes.jobs))
    counts = _event_counts(states, sizes.events, rng)
    counts[0] = max(counts[0], 6)
    rows = []
    for i, (state, when, n) in enumerate(zip(states, created, counts, strict=True)):
        recipe = recipes[i % len(recipes)]
        finished = (
            when + timedelta(hours=rng.uniform(0.2, 30)) if state in ("succeeded", "failed", "cancelled") else None
        )
        steps = max(1, n - 4)
        rows.append(
            {
                "id": new_id("job", now=when.timestamp()),
                "tenant_id": None,
                "tenant": 0 if i == 0 else rng.randrange(sizes.tenants),
                "term_id": TERM,
                "name": recipe["name"],
                "model_id": recipe["model"]["id"],
                "method": recipe["method"]["type"],
                "gpus": recipe["resources"]["gpus"],
                "recipe": recipe,
                "state": state,
                "attempt": 0,
                "reason": REASONS.get(state),
                "error": {"code": "training_error"} if state == "failed" else None,
                "created_at": when,
                "validating_at": when if state != "queued" else None,
                "started_at": when if n > 3 else None,
                "finished_at": finished,
                "updated_at": finished or when,
                "next_position": n + 1,
                "last_seq": max(0, n - 3 - (finished is not None)),
                "step": steps if n > 4 else 0,
                "total_steps": steps if finished else steps * 2,
                "loss": 1.1 if n > 4 else None,
                "events": n,
            }
        )
    return rows


def _batches(rows: Iterator[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    for r in rows:
        batch.append(r)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _interleaved(jobs: list[dict[str, Any]], rng: random.Random, width: int = 16) -> Iterator[dict[str, Any]]:
    """Every job's events, ``width`` jobs at a time round-robin: jobs that ran together wrote
    together, so a job's events are spread over the table as in a real one (not stored contiguously)."""
    for start in range(0, len(jobs), width):
        streams = [_history(j, j["events"], rng) for j in jobs[start : start + width]]
        while streams:
            for s in list(streams):
                r = next(s, None)
                if r is None:
                    streams.remove(s)
                else:
                    yield r


def build(url: str, sizes: argparse.Namespace, seed: int) -> Built:
    """Migrate an empty database at ``url`` and fill it; returns the keys, the jobs and timings."""
    rng, t0 = random.Random(seed), time.perf_counter()
    migrate(url)
    engine = make_engine(url)
    keys, tenant_ids = [], []
    with transaction(sessions(engine)) as session:
        admin.create_term(session, TERM, starts_at=datetime.now(UTC) - timedelta(days=61))
        for t in range(sizes.tenants):
            tenant, key = admin.create_tenant(session, f"bench tenant {t:03d}")
            admin.grant(session, tenant.id, TERM, points=1000)
            keys.append(key.key)
            tenant_ids.append(tenant.id)
    jobs = _jobs(sizes, rng)
    for j in jobs:
        j["tenant_id"] = tenant_ids[j["tenant"]]
    job_cols = set(Job.__table__.columns.keys())
    with engine.begin() as conn:
        for batch in _batches(iter(jobs), 1000):
            conn.execute(insert(Job), [{k: v for k, v in j.items() if k in job_cols} for j in batch])
    t1 = time.perf_counter()
    _insert_events(engine, jobs, rng)
    t2 = time.perf_counter()
    if engine.dialect.name == "postgresql":  # autovacuum would analyse a table grown this much
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM ANALYZE"))
    engine.dispose()
    jobs_of: list[list[JobInfo]] = [[] for _ in range(sizes.tenants)]
    for j in jobs:
        jobs_of[j["tenant"]].append(JobInfo(j["id"], j["tenant"], j["state"], j["events"]))
    hot = jobs_of[0][0]  # jobs[0], the oldest job, is tenant 0's running one
    seconds = {"tenants_and_jobs": t1 - t0, "events": t2 - t1, "total": time.perf_counter() - t0}
    return Built(tenant_ids, keys, jobs_of, hot, {k: round(v, 2) for k, v in seconds.items()})


def _insert_events(engine: Engine, jobs: list[dict[str, Any]], rng: random.Random) -> None:
    """Core executemany in batches on SQLite; COPY on PostgreSQL."""
    rows = _interleaved(jobs, rng)
    if engine.dialect.name != "postgresql":
        with engine.begin() as conn:
            for batch in _batches(rows, 10_000):
                conn.execute(insert(Event), batch)
        return
    columns = ("job_id", "position", "seq", "attempt", "kind", "time", "data")
    with engine.begin() as conn:
        cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        with cursor.copy(f"COPY events ({', '.join(columns)}) FROM STDIN") as copy:
            for r in rows:
                copy.write_row(
                    (
                        r["job_id"],
                        r["position"],
                        r["seq"],
                        r["attempt"],
                        r["kind"],
                        r["time"].replace(tzinfo=None),
                        json.dumps(r["data"]),
                    )
                )


# ------------------------------------------------------------------------------ databases, server


@contextmanager
def database(kind: str, workdir: Path) -> Iterator[str]:
    """An empty database of ``kind``: a SQLite file, or a fresh PostgreSQL database dropped afterwards."""
    if kind == "sqlite":
        yield f"sqlite:///{workdir / 'service.db'}"
        return
    import psycopg

    admin_url = POSTGRES.replace("postgresql+psycopg://", "postgresql://")
    name = f"finetune_bench_{secrets.token_hex(6)}"
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{POSTGRES.rsplit('/', 1)[0]}/{name}"
    finally:
        with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True).stdout.strip()


def service_code(at: str | None, workdir: Path) -> tuple[dict[str, Any], Path | None]:
    """Which service code the server runs, and the folder to import it from: a snapshot of the
    ``finetune`` package at commit ``at`` (others may be editing this checkout while it runs), or
    this checkout as it is (then its uncommitted changes to finetune/service/ are listed)."""
    if at is None:
        dirty = _git("status", "--porcelain", "--", "finetune/service").splitlines()
        return {"at": "working tree", "head": _git("rev-parse", "HEAD"), "uncommitted": dirty}, None
    commit, source = _git("rev-parse", f"{at}^{{commit}}"), workdir
    source.mkdir(parents=True)
    paths = ["finetune", "model_registry.yaml"]  # the package, and the registry it reads from its checkout
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, *paths], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(source)], input=archive.stdout, check=True)
    return {"at": commit, "subject": _git("log", "-1", "--format=%s", commit)}, source


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def serve(url: str, workdir: Path, app: str, source: Path | None = None) -> Iterator[tuple[str, int]]:
    """The service under uvicorn in a child process on loopback, its ``finetune`` package imported
    from ``source`` when given (a snapshot), else from this checkout; its base URL and pid."""
    port = _free_port()
    env = {
        **os.environ,
        "FINETUNE_SERVICE_DISPATCHER": "false",
        "FINETUNE_SERVICE_DATABASE_URL": url,
        "FINETUNE_DATA_DIR": str(workdir / "data"),
        "PYTHONPATH": os.pathsep.join(
            [*([str(source)] if source else []), str(HERE), os.environ.get("PYTHONPATH", "")]
        ),
    }
    log = (workdir / "server.log").open("wb")  # each app's log replaces the one before
    cmd = [
        sys.executable,
        "-m",
        "uvicorn",
        "--factory",
        app,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--no-access-log",
        "--log-level",
        "warning",
    ]
    # cwd is not the checkout: 'python -m' puts the cwd first on sys.path, before a snapshot
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            with suppress(httpx.HTTPError):
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the service did not start: {(workdir / 'server.log').read_text()[-2000:]}")
            time.sleep(0.2)
        yield base, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _log_errors(log: Path) -> dict[str, int]:
    """The exceptions the server logged, by their last line (type and message, cut short)."""
    found: dict[str, int] = {}
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        if re.match(r"^[\w.]+(Error|Exception|Timeout)\b.*:", line):
            key = line[:160]
            found[key] = found.get(key, 0) + 1
    return found


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------------------------ the writer


def _writer(url: str, job_id: str, rate: float, ready: Any, stop: Any, out: Any) -> None:
    """Append one step event every 1/``rate`` s to ``job_id``, each in its own transaction, with the
    wall time of its writing in its data; report the count and the commit times."""
    engine = make_engine(url)
    factory = sessions(engine)
    commits: list[float] = []
    with engine.connect():
        ready.set()
    start, n = time.time(), 0
    while not stop.is_set():
        due = start + n / rate
        if (wait := due - time.time()) > 0:
            time.sleep(wait)
        n += 1
        t0 = time.perf_counter()
        with transaction(factory) as session:
            job = session.get(Job, job_id)
            assert job is not None
            data = {
                "seq": job.last_seq + 1,
                "step": job.step + 1,
                "loss": round(1.0 + random.random() * 0.1, 4),
                "lr": 2e-4,
                "tokens": 131_072,
                "tokens_per_s": 101_234.5,
                "written_at": time.time(),
            }
            add_events(session, job, [("step", data, job.last_seq + 1, None)])
            session.execute(
                update(Job)
                .where(Job.id == job_id)
                .values(last_seq=Job.last_seq + 1, step=Job.step + 1, loss=data["loss"])
            )
        commits.append(time.perf_counter() - t0)
    engine.dispose()
    out.put({"written": n, "commit_s": commits, "cpu_s": time.process_time()})


# -------------------------------------------------------------------------------------- the load


@dataclass
class Samples:
    latency: dict[str, list[float]] = field(default_factory=lambda: {op: [] for op in OPERATIONS})
    errors: dict[str, dict[str, int]] = field(default_factory=lambda: {op: {} for op in OPERATIONS})
    delays: list[float] = field(default_factory=list)  # hot-job events: received - written, seconds
    received: list[set[int]] = field(default_factory=list)  # positions each hot streamer got
    lag: list[float] = field(default_factory=list)  # this process's event-loop lag
    t0: float = field(default_factory=time.perf_counter)
    steady: float = 0.0  # seconds after t0 from which samples count (before: the warm-up's)
    warm: list[float] = field(default_factory=list)  # latencies of requests started in the warm-up
    warm_delays: list[float] = field(default_factory=list)
    slow: dict[int, list[float]] = field(default_factory=dict)  # second of the run -> its latencies
    machine: list[tuple[float, float]] = field(default_factory=list)  # each second: machine busy, server CPU

    def error(self, op: str, what: str) -> None:
        self.errors[op][what] = self.errors[op].get(what, 0) + 1

    def took(self, op: str, started: float) -> None:
        """A request of ``op`` started at ``started`` has its answer now."""
        latency = time.perf_counter() - started
        (self.latency[op] if started - self.t0 >= self.steady else self.warm).append(latency)
        self.slow.setdefault(int(started - self.t0), []).append(latency)

    def delivered(self, written_at: float) -> None:
        """A hot-job event written at ``written_at`` (wall clock) is received now."""
        now = time.time()
        steady = time.perf_counter() - self.t0 >= self.steady
        (self.delays if steady else self.warm_delays).append(now - written_at)


async def _sse(response: httpx.Response) -> Any:
    """The events of an SSE response as (position, data) pairs, as they arrive."""
    position, data = None, None
    async for line in response.aiter_lines():
        if line.startswith("id:"):
            position = int(line[3:].strip())
        elif line.startswith("data:"):
            data = line[5:].strip()
        elif line == "" and data is not None:
            yield position, json.loads(data)
            position, data = None, None


async def _stream(client: httpx.AsyncClient, job: JobInfo, after: int, seconds: float, s: Samples) -> None:
    t0 = time.perf_counter()
    async with client.stream("GET", f"/v1/jobs/{job.id}/events/stream", params={"after": after}) as r:
        s.took("stream", t0)  # headers: the stream is open
        if r.status_code != 200:
            s.error("stream", str(r.status_code))
            return
        with suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                async for _ in _sse(r):
                    pass


async def _one(
    client: httpx.AsyncClient, jobs: list[JobInfo], op: str, stream_s: float, rng: random.Random, s: Samples
) -> None:
    job = rng.choice(jobs)
    if op == "stream":
        await _stream(client, job, rng.randrange(job.events + 1), stream_s, s)
        return
    if op == "list_jobs":
        path, params = "/v1/jobs", {"limit": 20}
    elif op == "get_job":
        path, params = f"/v1/jobs/{job.id}", {}
    else:
        path, params = f"/v1/jobs/{job.id}/events", {"after": rng.randrange(max(1, job.events - 99)), "limit": 100}
    t0 = time.perf_counter()
    r = await client.get(path, params=params)
    s.took(op, t0)
    if r.status_code != 200:
        s.error(op, str(r.status_code))


async def _client(base: str, built: Built, deadline: float, args: argparse.Namespace, seed: int, s: Samples) -> None:
    rng = random.Random(seed)
    tenant = rng.randrange(len(built.keys))
    headers = {"Authorization": f"Bearer {built.keys[tenant]}"}
    ops, weights = list(WEIGHTS), list(WEIGHTS.values())
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=60) as client:
        while time.perf_counter() < deadline:
            op = rng.choices(ops, weights)[0]
            stream_s = min(args.stream_seconds, max(0.1, deadline - time.perf_counter()))
            try:
                await _one(client, built.jobs_of[tenant], op, stream_s, rng, s)
            except httpx.HTTPError as exc:
                s.error(op, type(exc).__name__)
            if args.think > 0:
                await asyncio.sleep(rng.expovariate(1 / args.think))


async def _hot_streamer(base: str, built: Built, start: int, deadline: float, s: Samples) -> None:
    """Follow the written job's stream until ``deadline``, resuming with Last-Event-ID after a break."""
    got: set[int] = set()
    s.received.append(got)
    last = start
    async with httpx.AsyncClient(
        base_url=base, headers={"Authorization": f"Bearer {built.keys[0]}"}, timeout=httpx.Timeout(60, read=None)
    ) as client:
        while (left := deadline - time.perf_counter()) > 0:
            with suppress(TimeoutError, httpx.HTTPError):
                async with (
                    asyncio.timeout(left),
                    client.stream(
                        "GET", f"/v1/jobs/{built.hot.id}/events/stream", headers={"Last-Event-ID": str(last)}
                    ) as r,
                ):
                    async for position, event in _sse(r):
                        written = event["data"].get("written_at")
                        if written is not None:
                            s.delivered(written)
                        got.add(position)
                        last = max(last, position)


def _busy() -> tuple[float, float]:
    """The machine's busy and total CPU time so far (all cores, /proc/stat ticks)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


async def _monitor(deadline: float, pid: int, s: Samples) -> None:
    """Each second: how busy the whole machine was (every process, other engineers' included) and
    how much of a core the server used; to tell a slow second of the server from a busy machine."""
    busy0, total0 = _busy()
    cpu0 = _cpu_seconds(pid)
    while time.perf_counter() < deadline:
        await asyncio.sleep(1.0)
        (busy, total), cpu = _busy(), _cpu_seconds(pid)
        s.machine.append((round((busy - busy0) / max(1, total - total0), 2), round(cpu - cpu0, 2)))
        busy0, total0, cpu0 = busy, total, cpu


async def _lag(deadline: float, s: Samples) -> None:
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        await asyncio.sleep(0.05)
        s.lag.append(time.perf_counter() - t0 - 0.05)


async def _warm_up(base: str, built: Built, stream_s: float) -> None:
    """One request of each kind first (the server's first requests import and compile; not measured)."""
    rng, s = random.Random(0), Samples()
    async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {built.keys[0]}"}) as client:
        for op in OPERATIONS:
            await _one(client, built.jobs_of[0], op, min(stream_s, 0.5), rng, s)


async def _calibrate(base: str, built: Built, pid: int, requests: int, streams: int) -> dict[str, Any]:
    """What each operation costs the server alone: one client, requests one after another (latency
    and server CPU per request); then ``streams`` open streams on jobs nobody writes to for
    ``requests / 20`` s (server CPU per stream and second: the cost of polling)."""
    rng, s, found = random.Random(2), Samples(), {}
    jobs = [j for js in built.jobs_of for j in js]
    async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {built.keys[0]}"}) as client:
        for op in ("list_jobs", "get_job", "list_events"):
            cpu0 = _cpu_seconds(pid)
            for _ in range(requests):
                await _one(client, built.jobs_of[0], op, 1.0, rng, s)
            cpu = (_cpu_seconds(pid) - cpu0) / requests
            found[op] = {"p50_ms": _ms(_pct(s.latency[op], 0.5)), "server_cpu_ms": _ms(cpu)}
    idle = [j for j in jobs if j.state not in ("succeeded", "failed", "cancelled") and j != built.hot][:streams]
    clients = [
        httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {built.keys[j.tenant]}"}) for j in idle
    ]
    cpu0 = _cpu_seconds(pid)
    t0 = time.perf_counter()
    seconds = max(1.0, requests / 20)
    await asyncio.gather(*(_stream(c, j, j.events, seconds, s) for c, j in zip(clients, idle, strict=True)))
    per = (_cpu_seconds(pid) - cpu0) / max(1, len(idle)) / (time.perf_counter() - t0)
    for c in clients:
        await c.aclose()
    found["open_stream_per_s"] = {"streams": len(idle), "server_cpu_ms": _ms(per)}
    return found


async def _stop_at(deadline: float, stop: Any) -> None:
    await asyncio.sleep(max(0.0, deadline - time.perf_counter()))
    stop.set()


async def drive(
    base: str, built: Built, start: int, args: argparse.Namespace, stop: Any, pid: int
) -> tuple[Samples, float]:
    """Run the clients for ``args.seconds`` and stop the writer then; the samples and the seconds it
    took until the last client ended."""
    s, t0 = Samples(), time.perf_counter()
    s.steady = args.warmup
    deadline = t0 + args.warmup + args.seconds
    hot = min(args.hot_streamers, args.clients)
    grace = 1.5  # hot streamers go on a little, so that the last events written can arrive
    tasks = [_hot_streamer(base, built, start, deadline + grace, s) for _ in range(hot)]
    tasks += [_client(base, built, deadline, args, args.seed * 1000 + i, s) for i in range(args.clients - hot)]
    await asyncio.gather(*tasks, _lag(deadline, s), _monitor(deadline, pid, s), _stop_at(deadline, stop))
    return s, time.perf_counter() - t0


# ---------------------------------------------------------------------------------------- figures


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def _ms(value: float | None) -> float | None:
    return None if value is None else round(1000 * value, 1)


def figures(s: Samples, elapsed: float, written: int) -> dict[str, Any]:
    """Percentiles and rates of the requests started after the warm-up, and of the hot-job events
    received after it; the warm-up's own worst apart."""
    elapsed -= s.steady
    ops = {}
    for op in OPERATIONS:
        lat = s.latency[op]
        ops[op] = {
            "count": len(lat),
            "per_s": round(len(lat) / elapsed, 1),
            "p50_ms": _ms(_pct(lat, 0.5)),
            "p99_ms": _ms(_pct(lat, 0.99)),
            "max_ms": _ms(max(lat, default=None)),
            "errors": s.errors[op],
        }
    missing = [written - len(got) for got in s.received]
    sse = {
        "streamers": len(s.received),
        "written": written,
        "delivered": len(s.delays),  # after the warm-up
        "p50_ms": _ms(_pct(s.delays, 0.5)),
        "p99_ms": _ms(_pct(s.delays, 0.99)),
        "max_ms": _ms(max(s.delays, default=None)),
        "later_than_1s": sum(d > 1.0 for d in s.delays),
        "never_delivered": sum(max(0, m) for m in missing),
    }
    return {
        "operations": ops,
        "sse": sse,
        "client_loop_lag_ms": {"p99": _ms(_pct(s.lag, 0.99)), "max": _ms(max(s.lag, default=None))},
        "seconds": _timeline(s),
        "warm_up": {
            "seconds": s.steady,
            "requests": len(s.warm),
            "max_ms": _ms(max(s.warm, default=None)),
            "sse_max_ms": _ms(max(s.warm_delays, default=None)),
        },
    }


def _timeline(s: Samples) -> dict[str, Any]:
    """Second by second: requests started, their slowest, how busy the machine was and how much of a
    core the server had; and the seconds holding a request slower than 1 s."""
    slowest = [max(s.slow.get(i, [0.0])) for i in range(len(s.machine))]
    slow = [i for i, worst in enumerate(slowest) if worst > 1.0]

    def mean(values: list[float]) -> float | None:
        return round(sum(values) / len(values), 2) if values else None

    return {
        "machine_busy_mean": mean([m for m, _ in s.machine]),
        "server_cores_mean": mean([c for _, c in s.machine]),
        "slow_seconds": len(slow),
        "machine_busy_in_slow_seconds": mean([s.machine[i][0] for i in slow]),
        "timeline": [
            {
                "second": i,
                "requests": len(s.slow.get(i, [])),
                "max_ms": _ms(worst),
                "machine_busy": machine,
                "server_cores": server,
            }
            for i, (worst, (machine, server)) in enumerate(zip(slowest, s.machine, strict=True))
        ],
    }


# --------------------------------------------------------------------------------------- a run


def _hot_position(url: str, job_id: str) -> int:
    engine = make_engine(url)
    with engine.connect() as conn:
        found = conn.execute(select(func.max(Event.position)).where(Event.job_id == job_id)).scalar()
    engine.dispose()
    return int(found or 0)


def load(url: str, base: str, server_pid: int, built: Built, args: argparse.Namespace) -> dict[str, Any]:
    """The writer and the clients for ``args.seconds``; the figures and the CPU each process used."""
    ctx = mp.get_context("spawn")
    ready, stop, out = ctx.Event(), ctx.Event(), ctx.Queue()
    start = _hot_position(url, built.hot.id)
    writer = ctx.Process(target=_writer, args=(url, built.hot.id, args.write_rate, ready, stop, out))
    asyncio.run(_warm_up(base, built, args.stream_seconds))
    alone = asyncio.run(_calibrate(base, built, server_pid, args.calibrate, 10))
    cpu0, mine0 = _cpu_seconds(server_pid), time.process_time()
    writer.start()
    if not ready.wait(timeout=120):
        raise RuntimeError("the writer did not start")
    samples, elapsed = asyncio.run(drive(base, built, start, args, stop, server_pid))
    wrote = out.get(timeout=60)
    writer.join(timeout=30)
    result = {"alone": alone, **figures(samples, elapsed, wrote["written"])}
    commits = wrote["commit_s"]
    result["writer"] = {
        "events": wrote["written"],
        "commit_p50_ms": _ms(_pct(commits, 0.5)),
        "commit_p99_ms": _ms(_pct(commits, 0.99)),
        "commit_max_ms": _ms(max(commits, default=None)),
    }
    result["cpu_seconds"] = {
        "server": round(_cpu_seconds(server_pid) - cpu0, 1),
        "clients": round(time.process_time() - mine0, 1),
        "writer": round(wrote["cpu_s"], 1),
        "wall": round(elapsed, 1),
    }
    return result


def machine() -> dict[str, Any]:
    import fastapi
    import sqlalchemy
    import uvicorn

    return {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "versions": {
            "fastapi": fastapi.__version__,
            "sqlalchemy": sqlalchemy.__version__,
            "uvicorn": uvicorn.__version__,
            "httpx": httpx.__version__,
        },
    }


class _Queries:
    """The statements a request makes, written as the service writes them, on random tenants and jobs."""

    def __init__(self, built: Built, rng: random.Random) -> None:
        self.built, self.rng = built, rng
        self.jobs = [j for js in built.jobs_of for j in js]
        self.queued = [j for j in self.jobs if j.state == "queued"] or self.jobs

    def _tenant(self) -> int:
        return self.rng.randrange(len(self.built.keys))

    def _scoped(self, t: int) -> Any:
        return select(Job).where(Job.tenant_id == self.built.tenant_ids[t], Job.term_id == TERM)

    def key(self) -> Any:
        from finetune.service.keys import key_hash
        from finetune.service.models import ApiKey

        return select(ApiKey).where(ApiKey.key_hash == key_hash(self.built.keys[self._tenant()]))

    def grant(self) -> Any:
        from finetune.service.models import Grant, Term

        current = (Term.starts_at <= datetime.now(UTC), Term.closed_at.is_(None), Term.purged_at.is_(None))
        query = select(Grant, Term).join(Term, Term.id == Grant.term_id)
        query = query.where(Grant.tenant_id == self.built.tenant_ids[self._tenant()], *current)
        return query.order_by(Term.starts_at.desc()).limit(1)

    def page(self) -> Any:
        return self._scoped(self._tenant()).order_by(Job.id.desc()).limit(21)

    def queue_position(self) -> Any:
        ahead = (Job.state == "queued", Job.id < self.rng.choice(self.queued).id)
        return select(func.count()).select_from(Job).where(*ahead)

    def job(self) -> Any:
        t = self._tenant()
        return self._scoped(t).where(Job.id == self.rng.choice(self.built.jobs_of[t]).id)

    def events(self, tail: bool = False) -> Any:
        j = self.rng.choice(self.jobs)
        after = j.events if tail else self.rng.randrange(max(1, j.events - 99))
        query = select(Event).where(Event.job_id == j.id, Event.position > after).order_by(Event.position)
        return query.limit(500 if tail else 101)

    def state(self) -> Any:
        return select(Job.state).where(Job.id == self.rng.choice(self.jobs).id)


def query_plans(url: str, built: Built, repeat: int = 30) -> dict[str, Any]:
    """Each query a request makes, on this database: its plan (EXPLAIN QUERY PLAN; EXPLAIN ANALYZE on
    PostgreSQL) and its time through the ORM (``repeat`` times on random tenants and jobs, warm cache)."""
    q = _Queries(built, random.Random(1))
    makers = {
        "caller: key by hash": q.key,
        "tenant_scope: current grant": q.grant,
        "list_jobs: a page": q.page,
        "list_jobs: queue position (each queued job)": q.queue_position,
        "get_job: scope.job": q.job,
        "list_events: a page of 100": q.events,
        "stream poll: job state": q.state,
        "stream poll: new events": lambda: q.events(tail=True),
    }
    engine = make_engine(url)
    seen: list[tuple[str, Any]] = []
    event.listen(engine, "before_cursor_execute", lambda _c, _cur, sql, params, *_: seen.append((sql, params)))
    explain = "EXPLAIN QUERY PLAN " if engine.dialect.name == "sqlite" else "EXPLAIN (ANALYZE, BUFFERS) "
    found: dict[str, Any] = {}
    with sessions(engine)() as session:
        for name, make in makers.items():
            times = []
            for _ in range(repeat):
                t0 = time.perf_counter()
                session.execute(make()).all()
                times.append(time.perf_counter() - t0)
                session.expunge_all()
            sql, params = seen[-1]
            plan = [str(r[-1]) for r in session.connection().exec_driver_sql(explain + sql, params)]
            found[name] = {
                "sql": " ".join(sql.split()),
                "p50_ms": _ms(_pct(times, 0.5)),
                "max_ms": _ms(max(times)),
                "plan": plan,
                "plan_summary": _plan_summary(plan),
            }
    engine.dispose()
    return found


def _plan_summary(plan: list[str]) -> str:
    """The plan's scans (which table, which index), one line."""
    words = ("SCAN", "SEARCH", "Scan", "Index", "TEMP", "Sort", "Execution Time")
    return "; ".join(line.strip().split("  (cost")[0] for line in plan if any(w in line for w in words))


def _server_version(url: str) -> str:
    engine = make_engine(url)
    with engine.connect() as conn:
        query = "SELECT sqlite_version()" if engine.dialect.name == "sqlite" else "SHOW server_version"
        version = str(conn.execute(text(query)).scalar())
    engine.dispose()
    return version


def run(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    """Build one database, then serve and load it with each app in turn; the result to record."""
    with tempfile.TemporaryDirectory(prefix="service-load-") as tmp, database(kind, Path(tmp)) as url:
        workdir = Path(tmp)
        print(f"[{kind}] building {args.tenants} tenants, {args.jobs} jobs, {args.events} events ...", flush=True)
        built = build(url, args, args.seed)
        print(f"[{kind}] built in {built.seconds['total']:.1f} s ({built.seconds})", flush=True)
        size = (workdir / "service.db").stat().st_size if kind == "sqlite" else None
        plans = query_plans(url, built)
        states: dict[str, int] = {}
        for j in (j for jobs in built.jobs_of for j in jobs):
            states[j.state] = states.get(j.state, 0) + 1
        runs: list[dict[str, Any]] = []
        result: dict[str, Any] = {
            "benchmark": "service_load",
            "database": kind,
            "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "device": machine(),
            "database_version": _server_version(url),
            "sizes": {
                "tenants": args.tenants,
                "jobs": args.jobs,
                "events": args.events,
                "job_states": states,
                "sqlite_file_bytes": size,
            },
            "settings": _settings(args),
            "build_seconds": built.seconds,
            "queries": plans,
            "runs": runs,
        }
        for app in args.app:
            name, _, at = app.partition("@")
            factory = APPS.get(name, name)
            code, source = service_code(at or args.at, workdir / f"code-{len(runs)}")
            print(f"[{kind}] {app} at {code['at']}: {args.clients} clients for {args.seconds} s ...", flush=True)
            with serve(url, workdir, factory, source) as (base, pid):
                figures_ = load(url, base, pid, built, args)
            figures_["server_log_errors"] = _log_errors(workdir / "server.log")
            runs.append(
                {
                    "app": app,
                    "factory": factory,
                    "service_code": code,
                    "load_average_after": _load(),
                    **figures_,
                    "aim": _aim(figures_),
                }
            )
        return result


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "apps": args.app,
        "clients": args.clients,
        "seconds": args.seconds,
        "warmup_seconds": args.warmup,
        "hot_streamers": args.hot_streamers,
        "write_rate_per_s": args.write_rate,
        "stream_seconds": args.stream_seconds,
        "think_s": args.think,
        "seed": args.seed,
        "mix": WEIGHTS,
        "state_mix": STATE_MIX,
        "server": "uvicorn, 1 process, asyncio loop + h11, no access log; dispatcher off; service defaults "
        "(SSE poll 0.25 s, SQLAlchemy pool defaults)",
        "clients_how": "one asyncio process (the script's), one httpx.AsyncClient (own connection) per client; "
        "each client a random tenant, requests back to back (closed loop) unless think_s > 0 (then an "
        "exponential pause of that mean between them); figures: requests started after warmup_seconds, the "
        "warm-up's worst apart (warm_up)",
        "ops": "list_jobs GET /v1/jobs?limit=20; get_job GET /v1/jobs/{id}; list_events GET /v1/jobs/{id}/events"
        "?after=<random>&limit=100; stream GET /v1/jobs/{id}/events/stream?after=<random>, read until it "
        "ends or for stream_seconds (its latency: until the response headers); percentiles over answered "
        "requests (any status), transport errors and timeouts (60 s) counted under errors",
        "writer": "a separate process: history.add_events of one step event + the job's progress, one transaction "
        "per event, at write_rate; data.written_at = time.time() before the insert",
        "sse_delay": "time.time() when the hot streamer parsed the event minus data.written_at (same machine clock)",
        "build": "Core insert() executemany (jobs, 1000 a batch; SQLite events, 10000 a batch), COPY for PostgreSQL "
        "events; events of 16 jobs at a time interleaved; PostgreSQL VACUUM ANALYZE after, SQLite no ANALYZE",
        "contention": "2 cores shared by the server, the clients, the writer, the database and other engineers' work",
    }


def _aim(result: dict[str, Any]) -> dict[str, Any]:
    ops, sse = result["operations"], result["sse"]
    p99 = [ops[op]["p99_ms"] for op in ("list_jobs", "get_job")]
    return {
        "list_get_p99_under_200ms": all(p is not None and p < 200 for p in p99),
        "no_event_later_than_1s": sse["later_than_1s"] == 0 and sse["never_delivered"] == 0,
    }


# ----------------------------------------------------------------------------------------- output


def _cell(v: Any) -> str:
    return "–" if v is None else f"{v:,}" if isinstance(v, int | float) else str(v)


def table(result: dict[str, Any]) -> str:
    """The result as markdown: the queries' plans and times, then one table per app."""
    lines = [
        f"{result['database']} ({result['database_version']}): {result['sizes']['tenants']} tenants, "
        f"{result['sizes']['jobs']:,} jobs, {result['sizes']['events']:,} events, built in "
        f"{result['build_seconds']['total']} s; {result['settings']['clients']} clients for "
        f"{result['settings']['seconds']} s",
        "",
        "| query (as the service makes it) | p50 ms | max ms | plan |",
        "|---|---|---|---|",
    ]
    for name, q in result["queries"].items():
        lines.append(f"| {name} | {_cell(q['p50_ms'])} | {_cell(q['max_ms'])} | {q['plan_summary']} |")
    for r in result["runs"]:
        lines += ["", *_run_table(r)]
    return "\n".join(lines)


def _run_table(result: dict[str, Any]) -> list[str]:
    cell = _cell
    solo = {op: f for op, f in result["alone"].items() if "p50_ms" in f}
    alone = ", ".join(f"{op} {f['p50_ms']} ms / {f['server_cpu_ms']} ms CPU" for op, f in solo.items())
    idle = result["alone"]["open_stream_per_s"]
    lines = [
        f"app: {result['app']} ({result['factory']})",
        "",
        f"alone, one client (p50 latency / server CPU a request): {alone}; an open stream with nothing new "
        f"costs the server {idle['server_cpu_ms']} ms CPU a second ({idle['streams']} open)",
        "",
        "| operation | count | req/s | p50 ms | p99 ms | max ms | errors |",
        "|---|---|---|---|---|---|---|",
    ]
    for op, f in result["operations"].items():
        errors = ", ".join(f"{k}×{v}" for k, v in f["errors"].items()) or "0"
        lines.append(
            f"| {op} | {cell(f['count'])} | {cell(f['per_s'])} | {cell(f['p50_ms'])} | {cell(f['p99_ms'])} "
            f"| {cell(f['max_ms'])} | {errors} |"
        )
    s, w, c = result["sse"], result["writer"], result["cpu_seconds"]
    t = result.get("seconds", {})  # (absent from results recorded before it was)
    warm = result.get("warm_up", {})
    lines += [
        "",
        f"SSE delivery ({s['streamers']} streamers, {s['written']} events written): p50 {cell(s['p50_ms'])} ms, "
        f"p99 {cell(s['p99_ms'])} ms, max {cell(s['max_ms'])} ms, later than 1 s: {s['later_than_1s']}, "
        f"never delivered: {s['never_delivered']}",
        f"writer commit p50 {cell(w['commit_p50_ms'])} ms, p99 {cell(w['commit_p99_ms'])} ms; CPU s: server "
        f"{c['server']}, clients {c['clients']}, writer {c['writer']} over {c['wall']} s; client loop lag p99 "
        f"{cell(result['client_loop_lag_ms']['p99'])} ms",
        f"machine busy (all cores, everyone's work) {cell(t.get('machine_busy_mean'))}, server used "
        f"{cell(t.get('server_cores_mean'))} core; seconds with a request slower than 1 s: "
        f"{cell(t.get('slow_seconds'))} (machine busy in them {cell(t.get('machine_busy_in_slow_seconds'))}); "
        f"warm-up {cell(warm.get('seconds'))} s not counted: {cell(warm.get('requests'))} requests, slowest "
        f"{cell(warm.get('max_ms'))} ms, SSE slowest {cell(warm.get('sse_max_ms'))} ms",
        f"aim: {result['aim']}; server errors logged: {sum(result['server_log_errors'].values())}",
    ]
    return lines


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--db", choices=("sqlite", "postgresql", "both"), default="both")
    p.add_argument("--tenants", type=int, default=100)
    p.add_argument("--jobs", type=int, default=10_000)
    p.add_argument("--events", type=int, default=1_000_000)
    p.add_argument("--clients", type=int, default=100, help="concurrent clients, the hot streamers among them")
    p.add_argument("--seconds", type=float, default=60.0, help="how long the clients run, measured")
    p.add_argument("--warmup", type=float, default=5.0, help="seconds the clients run first, not measured")
    p.add_argument("--hot-streamers", type=int, default=5, help="clients that follow the written job's stream")
    p.add_argument("--write-rate", type=float, default=50.0, help="events a second appended to the written job")
    p.add_argument("--stream-seconds", type=float, default=2.0, help="how long a client reads a stream at most")
    p.add_argument("--think", type=float, default=0.0, help="mean pause between a client's requests (s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calibrate", type=int, default=100, help="requests of each kind made alone first")
    p.add_argument(
        "--app",
        action="append",
        help="'service' (default), 'patched' (the service with the changes this benchmark proposed, patched "
        "in) or a uvicorn factory 'module:function', each optionally '@COMMIT' (its code at that commit); "
        "repeat to load each in turn",
    )
    p.add_argument("--results", type=Path, default=RESULTS, help="folder of the JSON results")
    p.add_argument("--at", help="run the service's code at this commit (a snapshot), not the checkout's")
    p.add_argument("--tag", default="", help="added to the JSON's name: service-load-<db>-<tag>-<date>.json")
    args = p.parse_args(argv)
    args.app = args.app or ["service"]
    if args.jobs < args.tenants or args.events < 6 * args.jobs:
        p.error("at least one job per tenant and 6 events per job on average")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    args.results.mkdir(parents=True, exist_ok=True)
    for kind in ("sqlite", "postgresql") if args.db == "both" else (args.db,):
        result = run(kind, args)
        tag = f"-{args.tag}" if args.tag else ""
        path = args.results / f"service-load-{kind}{tag}-{datetime.now(UTC):%Y%m%d}.json"
        path.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        print(table(result), f"\nwritten {path}", sep="\n", flush=True)
    return 0


# --------------------------------------------------------------------------- the proposed change


def patched_app() -> Any:
    """The service with the changes this benchmark proposed, applied by patching, for measuring them
    before they were made (``--app patched``); commit a37bb6c made them in ``finetune/service/``:

    - tenant routes take their scope with ``Depends(tenant_scope, scope="function", max_concurrency=24)``:
      the session (and its pooled connection) is closed when the route returns, not when an event
      stream ends, and at most 24 requests hold one at once, waiting without a thread or a connection;
    - SQLite's pool is as large as PostgreSQL's (20 + 20 overflow), above that limit;
    - a key's ``last_used_at`` is written at most once a minute per process, not by every request
      that arrives before the first write commits.
    """
    from typing import Annotated

    from fastapi import Depends
    from sqlalchemy.orm import Session
    from sqlalchemy.orm.attributes import set_committed_value

    import finetune.service.db as db
    import finetune.service.scope as scope
    from finetune.service.models import ApiKey

    plain, touched = db.make_engine, dict[str, datetime]()

    def make_engine(url: str, **kwargs: Any) -> Engine:
        if url.startswith("sqlite") and "poolclass" not in kwargs:
            kwargs = {"pool_size": 20, "max_overflow": 20, **kwargs}
        return plain(url, **kwargs)

    def find_key(session: Session, key: str, find: Any = scope.find_key) -> ApiKey | None:
        row, now = find(session, key), datetime.now(UTC)
        if row is not None:
            last = touched.get(row.id)
            if last is not None and now - last < scope.LAST_USED_EVERY:
                set_committed_value(row, "last_used_at", last)  # so caller() does not write it again
            else:
                touched[row.id] = now
        return row

    db.make_engine, scope.find_key = make_engine, find_key
    scope.Tenancy = Annotated[  # type: ignore[assignment]
        scope.TenantScope, Depends(scope.tenant_scope, scope="function", max_concurrency=24)
    ]
    from finetune.service.app import create_app  # its routes import the patched Tenancy

    return create_app()


if __name__ == "__main__":
    sys.exit(main())
