"""Distributed training on Ray: 2 workers follow the 1-worker loss curve; a killed worker is replaced.

The reference is one process (``--launcher local``, ZeRO-0, micro batch 2 x accumulation 2). The
Ray runs use 2 workers with micro batch 1 x accumulation 2 under ZeRO-2 and ZeRO-3: the same 4
rows per optimizer step (the plan hands every global step the same rows in both layouts, checked
below), so the same loss, gradient norm and weights are expected, up to floating-point reduction
order. A tiny random model (SmolLM2 architecture) is fully fine-tuned in fp32 for 24 steps
(2.4 epochs), with gradient clipping active (the gradient norms are above 1).

Tolerances. fp32 has a unit roundoff of 6e-8. Between the layouts only the order of sums changes
(per-row partial sums, gloo's all-reduce, ZeRO's flat buffers), so the losses, which are sums of
token losses, agree to about 1e-7 relative; gradient norms sum 140k squares in a different order
and agree to about 1e-5. The bounds below leave 10-100x headroom over what was measured (see the
report of the test, printed with ``-s``) and still catch real mistakes: a row handed to the wrong
step changes the trained-token count (compared exactly) and the loss by far more (step losses differ
by 1e-2 and more), and a wrong world-size scaling of the loss doubles or halves the gradient norm
(Adam would hide it in the loss curve, the norm does not).

The ZeRO-3 runs keep everything in a tenant bucket on the S3 server on loopback: the prepared data,
the events, the checkpoints and the final model. Each worker has its own scratch folder; nothing
passes between them but the bucket. The failure test kills a Ray Train worker with SIGKILL once a
checkpoint is committed, as a crashed node would; Ray restarts the worker group
(``settings.ray_max_failures``) and the job resumes from its newest trustworthy checkpoint in the
bucket, each worker fetching what it needs into its own scratch. No test hook in the library.

Ray starts once for the module; the whole module took about 4-5 minutes on 2 shared CPU cores.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from finetune.events import Event, read_events
from finetune.jobstore import FINAL, JobStore
from finetune.published import fetch_folder, read_marker
from finetune.recipe import Recipe
from finetune.settings import Settings
from finetune.storage import Bucket, StorageConfig
from finetune.train.checkpoint_files import trusted
from finetune.train.plan import make_plan

ROOT = Path(__file__).resolve().parents[2]
STEPS = 24
SAVE_EVERY = 4
LOSS_RTOL = 1e-5  # measured: about 1e-7 (see the module docstring)
GRAD_NORM_RTOL = 1e-4  # measured: about 1e-5
WEIGHT_ATOL = 1e-5  # measured: about 1e-7 on weights of magnitude up to 1
RESUME_RTOL = 1e-6  # the same layout before and after a resume: the same sums in the same order


def _recipe(*, workers: int, micro_batch: int, zero_stage: int) -> dict[str, Any]:
    return {
        "name": "distributed",
        "model": {"id": "smollm2-135m-instruct", "tiny": True},
        "data": {"path": "data/quickstart.jsonl", "format": "messages", "max_seq_len": 128, "eval": {"fraction": 0.1}},
        "method": {"type": "full"},
        "training": {
            "max_steps": STEPS,
            "learning_rate": 0.002,
            "warmup_steps": 2,
            "micro_batch_size": micro_batch,
            "gradient_accumulation_steps": 2,
            "gradient_checkpointing": False,
            "precision": "fp32",
            "seed": 42,
            "eval_every_steps": 12,
            "save_every_steps": SAVE_EVERY,
        },
        "resources": {"gpus": workers, "zero_stage": zero_stage},
    }


ONE_WORKER = _recipe(workers=1, micro_batch=2, zero_stage=0)


def two_workers(stage: int) -> dict[str, Any]:
    return _recipe(workers=2, micro_batch=1, zero_stage=stage)


# ------------------------------------------------------------------------------ the plan (no Ray)


@pytest.mark.parametrize("rows", [7, 39, 40, 41])
def test_both_layouts_give_every_global_step_the_same_rows(rows: int) -> None:
    def plan(recipe: dict[str, Any]) -> Any:
        r = Recipe.model_validate(recipe)
        return make_plan(r, rows=rows, world_size=r.resources.gpus, row_tokens=128)

    one, two = plan(ONE_WORKER), plan(two_workers(2))
    assert one.rows_per_step == two.rows_per_step == 4
    assert (one.steps_per_epoch, one.total_steps) == (two.steps_per_epoch, two.total_steps)
    for step in range(STEPS):
        single = [i for micro in one.micro_batches(step, 0) for i in micro]
        split = [i for rank in range(2) for micro in two.micro_batches(step, rank) for i in micro]
        assert len(single) == 4 and sorted(single) == sorted(split), step


# ------------------------------------------------------------------------------ runs


@dataclass
class Run:
    store: JobStore
    summary: Any
    key: Any
    records: list[Event] = field(default_factory=list)

    @classmethod
    def of(cls, store: JobStore, summary: Any, key: Any) -> Run:
        return cls(store, summary, key, read_events(store.bucket, store.prefix))

    def train(self, records: list[Event] | None = None) -> dict[int, Any]:
        return {e.step: e for e in (records if records is not None else self.records) if e.kind == "step"}

    def evals(self) -> dict[int, float]:
        return {e.step: e.eval_loss for e in self.records if e.kind == "eval"}

    def events(self) -> list[Event]:
        return [e for e in self.records if e.kind in ("start", "resume", "preempted", "end", "failure")]

    def weights(self) -> dict[str, torch.Tensor]:
        import tempfile

        from safetensors.torch import load_file

        rel = self.store.path(FINAL)
        manifest = read_marker(self.store.bucket, rel, "final", self.key)
        state: dict[str, torch.Tensor] = {}
        with tempfile.TemporaryDirectory() as tmp:
            fetch_folder(self.store.bucket, rel, manifest, Path(tmp))
            for path in sorted(Path(tmp).glob("*.safetensors")):
                state.update(load_file(path))
        assert state, f"no weights in {self.store.describe(FINAL)}"
        return state


@dataclass
class Workspace:
    root: Path
    bucket: Path
    settings: Settings
    s3: StorageConfig

    @property
    def key(self) -> Any:
        return self.settings.signer().public

    def plan(self, name: str, recipe: dict[str, Any], *, on_s3: bool = False) -> tuple[Any, JobStore]:
        """Plan the job (data prepared, tiny model made, data published): in a local job folder, or
        under ``jobs/<name>`` in the tenant's S3 bucket, which also holds the dataset."""
        from finetune.registry import Registry
        from finetune.train.launch import plan_job

        registry = Registry.load(self.settings.registry, self.settings.lock_path)
        validated = Recipe.model_validate(recipe)
        if on_s3:
            tenant = Bucket(self.s3, "t1", "2026q1")
            tenant.upload(self.bucket / "data" / "quickstart.jsonl", "data/quickstart.jsonl")
            data, store = tenant, JobStore(tenant, f"jobs/{name}", name)
        else:
            data, store = Bucket.folder(self.bucket), JobStore.folder(self.root / "jobs" / name)
        spec, _ = plan_job(validated, data, store, self.settings, registry=registry)
        return spec, store


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


@pytest.fixture(scope="module")
def workspace(
    tmp_path_factory: pytest.TempPathFactory, s3_server: dict[str, str], s3_storage: Callable[[str], StorageConfig]
) -> Workspace:
    root = tmp_path_factory.mktemp("distributed")
    bucket = root / "bucket"
    (bucket / "data").mkdir(parents=True)
    shutil.copy(ROOT / "recipes" / "data" / "quickstart.jsonl", bucket / "data" / "quickstart.jsonl")
    settings = Settings(
        data_dir=root / "data", model_store=root / "data" / "models", storage_url=None, events_flush_seconds=0.001,
        s3_access_key_id=s3_server["access_key_id"], s3_secret_access_key=s3_server["secret_access_key"],
    )  # fmt: skip
    return Workspace(root, bucket, settings, s3_storage("distributed"))


@pytest.fixture(scope="module")
def ray_cluster(s3_server: dict[str, str]) -> Iterator[None]:
    """One private local Ray cluster for the module (starting one costs ~10 s).

    The workers inherit this process's environment as it is when the cluster starts: the S3
    credentials reach them there, as on a real cluster (never through the job spec).
    """
    ray = pytest.importorskip("ray")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_AUTH_MODE", "disabled")  # a local, private cluster; avoids the token warning
        mp.delenv("RAY_ADDRESS", raising=False)  # never join a cluster the environment points at
        mp.setenv("FINETUNE_S3_ACCESS_KEY_ID", s3_server["access_key_id"])
        mp.setenv("FINETUNE_S3_SECRET_ACCESS_KEY", s3_server["secret_access_key"])
        ray.init(address="local", num_cpus=2, include_dashboard=False)  # private, even beside a running head
        try:
            yield
        finally:
            ray.shutdown()


@pytest.fixture(scope="module")
def reference(workspace: Workspace) -> Run:
    """1 worker in this process, ZeRO-0, micro batch 2 x accumulation 2."""
    from finetune.train.launch import launch

    spec, store = workspace.plan("one-worker", ONE_WORKER)
    return Run.of(store, launch(spec, "local", workspace.settings), workspace.key)


@pytest.fixture(scope="module")
def two_worker_run(workspace: Workspace, ray_cluster: None) -> Callable[[int], Run]:
    """The uninterrupted 2-worker Ray run of a ZeRO stage, run once for the module (ZeRO-3 on S3)."""
    from finetune.train.launch import launch

    runs: dict[int, Run] = {}

    def run(stage: int) -> Run:
        if stage not in runs:
            spec, store = workspace.plan(f"two-workers-zero{stage}", two_workers(stage), on_s3=stage == 3)
            runs[stage] = Run.of(store, launch(spec, "ray", workspace.settings), workspace.key)
        return runs[stage]

    return run


def _compare(got: Run, ref: Run, *, rtol_loss: float, rtol_norm: float, atol_weights: float) -> dict[str, float]:
    """Assert that two runs took the same steps on the same rows with the same results; the figures."""
    mine, theirs = got.train(), ref.train()
    assert sorted(mine) == sorted(theirs) == list(range(1, STEPS + 1))
    for step, r in mine.items():
        t = theirs[step]
        assert (r.trained_tokens, r.tokens) == (t.trained_tokens, t.tokens), f"other rows at step {step}"
        assert r.lr == pytest.approx(t.lr, rel=1e-12)
    figures = {
        "loss": max(_rel(mine[s].loss, theirs[s].loss) for s in mine),
        "grad_norm": max(_rel(mine[s].grad_norm, theirs[s].grad_norm) for s in mine),
    }
    evals_mine, evals_ref = got.evals(), ref.evals()
    assert sorted(evals_mine) == sorted(evals_ref) == [12, 24]
    figures["eval_loss"] = max(_rel(evals_mine[s], evals_ref[s]) for s in evals_mine)
    w_mine, w_ref = got.weights(), ref.weights()
    assert set(w_ref) <= set(w_mine), sorted(set(w_ref) - set(w_mine))
    figures["weights"] = max(float((w_mine[k].float() - w_ref[k].float()).abs().max()) for k in w_ref)
    print(
        f"\n{got.store.job_id} vs {ref.store.job_id}: max relative difference of the loss {figures['loss']:.2e}, "
        f"of the grad norm {figures['grad_norm']:.2e}, of the eval loss {figures['eval_loss']:.2e}; "
        f"max absolute difference of a final weight {figures['weights']:.2e}"
    )
    assert figures["loss"] <= rtol_loss, figures
    assert figures["eval_loss"] <= rtol_loss, figures
    assert figures["grad_norm"] <= rtol_norm, figures
    assert figures["weights"] <= atol_weights, figures
    return figures


# ------------------------------------------------------------------------------ parity


@pytest.mark.integration
@pytest.mark.parametrize("stage", [2, 3])
def test_two_ray_workers_follow_the_one_worker_loss_curve(
    stage: int, reference: Run, two_worker_run: Callable[[int], Run]
) -> None:
    run = two_worker_run(stage)
    assert run.summary.zero_stage == stage and run.summary.steps == STEPS
    assert reference.summary.zero_stage == 0
    assert [e.kind for e in run.events()] == ["start", "end"]
    assert "of 4 rows" in run.events()[0].detail
    losses = [e.loss for e in run.train().values()]
    assert losses[-1] < losses[0] - 0.5  # it learns (a flat curve would agree trivially)
    _compare(run, reference, rtol_loss=LOSS_RTOL, rtol_norm=GRAD_NORM_RTOL, atol_weights=WEIGHT_ATOL)


@pytest.mark.integration
def test_zero3_final_model_holds_the_same_tensors_as_one_worker(
    reference: Run, two_worker_run: Callable[[int], Run]
) -> None:
    run = two_worker_run(3)
    assert run.store.bucket.config.protocol == "s3"
    assert sorted(run.weights()) == sorted(reference.weights())


@pytest.mark.integration
def test_two_worker_zero3_checkpoint_archives_to_the_final_model(
    workspace: Workspace, two_worker_run: Callable[[int], Run], tmp_path: Path
) -> None:
    """DeepSpeed consolidates both workers' ZeRO-3 shards of the last checkpoint (fetched from S3)
    into the final model."""
    from safetensors.torch import load_file

    from finetune.archive import build_archive, verify_archive
    from finetune.archive.tarball import safe_extract
    from finetune.registry import Registry

    run = two_worker_run(3)
    assert _committed(run)[-1] == STEPS
    registry = Registry.load(workspace.settings.registry)
    logits = []
    for name, checkpoint in (("final.tar", None), ("last.tar", f"step-{STEPS:09d}")):
        out = tmp_path / name
        build_archive(run.store, out, registry=registry, settings=workspace.settings, checkpoint=checkpoint)
        report = verify_archive(out, key=workspace.key)
        assert report.ok, report.problems
        dest = tmp_path / name.replace(".", "-")
        dest.mkdir()
        top = safe_extract(out, dest).top
        assert top is not None
        logits.append(load_file(dest / top / "verification" / "reference.safetensors")["logits"])
    assert torch.equal(logits[0], logits[1])

    from finetune.archive import fetch_archive, publish_archive

    publish_archive(run.store, tmp_path / "final.tar", workspace.settings.signer(), {"step": STEPS})
    fetched = fetch_archive(run.store, workspace.key, tmp_path / "downloaded")
    assert fetched.read_bytes() == (tmp_path / "final.tar").read_bytes()


# ------------------------------------------------------------------------------ worker failure


def _committed(run_or_store: Run | JobStore, key: Any = None) -> list[int]:
    if isinstance(run_or_store, Run):
        return [info.step for info in trusted(run_or_store.store, run_or_store.key)]
    return [info.step for info in trusted(run_or_store, key)]


def _ray_train_workers() -> list[Any]:
    import psutil

    found = []
    for proc in psutil.Process().children(recursive=True):  # the raylet is our child, its workers ours
        try:
            if "RayTrainWorker" in " ".join(proc.cmdline()):
                found.append(proc)
        except psutil.Error:
            continue
    return found


class Killer(threading.Thread):
    """SIGKILLs a Ray Train worker as soon as a checkpoint of the job is committed in the bucket."""

    def __init__(self, store: JobStore, key: Any, timeout_s: float) -> None:
        super().__init__(daemon=True)
        self.store, self.key, self.timeout_s = store, key, timeout_s
        self.victim: int | None = None
        self.committed: list[int] = []  # trustworthy checkpoints once the victim was dead
        self.trained: list[Event] = []  # step events published before the kill
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # reported by the test
            self.error = exc

    def _run(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            workers = _ray_train_workers()
            if len(workers) == 2 and _committed(self.store, self.key):
                victim = min(workers, key=lambda p: p.pid)
                os.kill(victim.pid, signal.SIGKILL)
                victim.wait(timeout=60)
                self.victim = victim.pid
                self.committed = _committed(self.store, self.key)
                events = read_events(self.store.bucket, self.store.prefix)
                self.trained = [e for e in events if e.kind == "step"]
                return
            time.sleep(0.02)
        raise TimeoutError(f"no checkpoint committed (or no Ray Train worker found) within {self.timeout_s} s")


@pytest.mark.integration
def test_a_killed_worker_is_replaced_and_the_job_resumes_from_the_bucket(
    workspace: Workspace, two_worker_run: Callable[[int], Run]
) -> None:
    """ZeRO-3 on two workers with their own scratch folders and an S3 bucket: SIGKILL, Ray's restart,
    resume from the bucket, and the uninterrupted run's final weights."""
    from finetune.train.launch import launch

    uninterrupted = two_worker_run(3)
    spec, store = workspace.plan("two-workers-killed", two_workers(3), on_s3=True)
    killer = Killer(store, workspace.key, timeout_s=300)
    killer.start()
    started = time.monotonic()
    summary = launch(spec, "ray", workspace.settings)  # FailureConfig(max_failures=settings.ray_max_failures)
    killer.join(timeout=10)
    elapsed = time.monotonic() - started
    assert killer.error is None, killer.error
    assert killer.victim is not None, "the worker was never killed"
    killed_after = max(e.step for e in killer.trained)
    assert killed_after < STEPS, "the kill came after the last step: nothing was tested"

    run = Run.of(store, summary, workspace.key)
    assert summary.steps == STEPS and not summary.preempted and summary.zero_stage == 3
    events = run.events()
    # the surviving worker may record the lost peer as a failure, a transient one, before Ray restarts the group
    assert [e.kind for e in events if e.kind != "failure"] == ["start", "resume", "end"], events
    assert all(e.error.fault == "transient" for e in events if e.kind == "failure"), events
    events = [e for e in events if e.kind != "failure"]
    resume = events[1]
    newest = max(killer.committed)
    assert resume.checkpoint == f"step-{resume.step:09d}" and resume.step >= newest, (resume, killer.committed)
    assert SAVE_EVERY <= resume.step < STEPS
    # every step from the checkpoint on was trained again by the new worker group, in order
    after = run.records[run.records.index(resume) + 1 :]
    assert [e.step for e in after if e.kind == "step"] == list(range(resume.step + 1, STEPS + 1))
    print(
        f"\nkilled a worker (pid {killer.victim}) after step {killed_after}; trustworthy checkpoints then: "
        f"{killer.committed}; resumed at step {resume.step} from the bucket; the job took {elapsed:.0f} s"
    )
    # the curve before the kill and after the resume is the uninterrupted run's
    ref = uninterrupted.train()
    for part in (run.train(killer.trained), run.train(after)):
        for step, e in part.items():
            assert e.trained_tokens == ref[step].trained_tokens, step
            assert _rel(e.loss, ref[step].loss) <= RESUME_RTOL, (step, e.loss, ref[step].loss)
            assert _rel(e.grad_norm, ref[step].grad_norm) <= RESUME_RTOL, step
    figures = _compare(run, uninterrupted, rtol_loss=RESUME_RTOL, rtol_norm=RESUME_RTOL, atol_weights=1e-7)
    assert all(math.isfinite(v) for v in figures.values())
    assert events[-1].summary.steps == STEPS
