"""A job interrupted by SIGKILL or SIGTERM resumes to exactly the uninterrupted run; cut-off checkpoints are ignored.

Every run here is a real ``python -m finetune.cli train`` process (full fine-tuning of a tiny
random-weight SmolLM2-architecture model on CPU) in the same environment, so the reference run
and the interrupted ones differ only in being interrupted. The comparison is exact: per-step
losses, gradient norms, learning rates and evaluation losses, and every tensor of the final
safetensors weights.

Timing: the processes are stopped when the job's events show step :data:`STOP_AT`, between the
checkpoints of steps :data:`SAVE_EVERY` and ``2 * SAVE_EVERY``, so the steps after the first
checkpoint are lost (SIGKILL) and must be redone. The job would have to run four more steps and
commit a checkpoint before the signal lands to reach the next checkpoint boundary.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from finetune.events import Event, read_events
from finetune.jobstore import JobStore
from finetune.published import MARKER, fetch_folder, read_marker
from finetune.settings import Settings
from finetune.storage import Bucket
from finetune.train.checkpoint_files import list_steps, prune, trusted

ROOT = Path(__file__).resolve().parents[2]
EXIT_PREEMPTED = 75
TOTAL_STEPS = 15
SAVE_EVERY = 5
STOP_AT = 6  # > SAVE_EVERY and not on a checkpoint boundary
RUN_TIMEOUT = 300.0  # seconds for one process, generous for a loaded CI machine

pytestmark = pytest.mark.integration


def _pairs() -> list[tuple[str, str]]:
    en = "zero one two three four five six seven eight nine".split()
    zh = "〇一二三四五六七八九"
    pairs = [(f"Spell the number {i}.", " ".join(en[int(d)] for d in str(i))) for i in range(10, 30)]
    pairs += [(f"請用中文寫出數字{i}。", "".join(zh[int(d)] for d in str(i))) for i in range(30, 40)]
    return pairs


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A bucket with a small chat dataset, a recipe checkpointing every few steps, and the environment."""
    root = tmp_path_factory.mktemp("resume")
    bucket = root / "bucket"
    (bucket / "data").mkdir(parents=True)
    with open(bucket / "data" / "qa.jsonl", "w", encoding="utf-8") as fh:
        for question, answer in _pairs():
            messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            fh.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
    recipe = {
        "name": "resume-test",
        "model": {"id": "smollm2-135m-instruct", "tiny": True},
        "data": {"path": "data/qa.jsonl", "format": "messages", "max_seq_len": 128, "eval": {"fraction": 0.1}},
        "method": {"type": "full"},
        "training": {
            "max_steps": TOTAL_STEPS,
            "learning_rate": 0.003,
            "micro_batch_size": 2,
            "gradient_checkpointing": False,
            "seed": 7,
            "save_every_steps": SAVE_EVERY,
            "eval_every_steps": 3,
        },
        "output": {"keep_checkpoints": 2},
    }
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe, allow_unicode=True), encoding="utf-8")
    env = {
        **os.environ,
        "FINETUNE_DATA_DIR": str(root / "data"),
        # one thread: the same arithmetic in every process, and no thread contention on a busy machine
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "FINETUNE_EVENTS_FLUSH_SECONDS": "0.001",  # every event published at once: the tests watch them
    }
    return {"root": root, "bucket": bucket, "recipe": root / "recipe.yaml", "env": env}


def _log(job: Path) -> Path:
    return job.parent / f"{job.name}.log"


def _start(setup: dict[str, Any], job: Path) -> subprocess.Popen[bytes]:
    """``finetune train`` as its own process, its output appended to ``<job>.log``."""
    command = [sys.executable, "-m", "finetune.cli", "train", str(setup["recipe"]), "--output", str(job)]
    command += ["--bucket", str(setup["bucket"])]
    with open(_log(job), "ab") as log:  # the child keeps its own copy of the descriptor
        log.write(f"\n$ {' '.join(command)}\n".encode())
        log.flush()
        return subprocess.Popen(command, cwd=ROOT, env=setup["env"], stdout=log, stderr=subprocess.STDOUT)


def _log_tail(job: Path, chars: int = 4000) -> str:
    return _log(job).read_text(encoding="utf-8", errors="replace")[-chars:] if _log(job).exists() else ""


def _finish(proc: subprocess.Popen[bytes], job: Path) -> int:
    try:
        return proc.wait(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"training process ran over {RUN_TIMEOUT} s:\n{_log_tail(job)}")


def _run(setup: dict[str, Any], job: Path) -> int:
    return _finish(_start(setup, job), job)


def _records(job: Path) -> list[Event]:
    return read_events(Bucket.folder(job), "") if job.is_dir() else []


def _last_step(job: Path) -> int:
    """The highest training step recorded so far (0 when none)."""
    return max((e.step for e in _records(job) if e.kind == "step"), default=0)


def _interrupt(setup: dict[str, Any], job: Path, sig: signal.Signals) -> tuple[int, int]:
    """Start a job, send ``sig`` once step :data:`STOP_AT` is recorded; return (exit code, step seen)."""
    proc = _start(setup, job)
    deadline = time.monotonic() + RUN_TIMEOUT
    while (seen := _last_step(job)) < STOP_AT:
        if proc.poll() is not None:
            pytest.fail(f"the job ended (code {proc.returncode}) before step {STOP_AT}:\n{_log_tail(job)}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            pytest.fail(f"step {STOP_AT} not reached in {RUN_TIMEOUT} s:\n{_log_tail(job)}")
        time.sleep(0.005)
    os.kill(proc.pid, sig)
    return _finish(proc, job), seen


def _train(job: Path) -> dict[int, Any]:
    """Step -> step event; when a step was recorded twice (lost, then redone) the records must agree."""
    out: dict[int, Any] = {}
    for event in _records(job):
        if event.kind == "step":
            if event.step in out:
                assert _figures(out[event.step]) == _figures(event), f"step {event.step} redone differently"
            out[event.step] = event
    return out


def _figures(event: Any) -> tuple[Any, ...]:
    return event.loss, event.grad_norm, event.lr, event.trained_tokens, event.epoch


def _evals(job: Path) -> dict[int, float]:
    return {e.step: e.eval_loss for e in _records(job) if e.kind == "eval"}


def _events(job: Path) -> list[tuple[str, int]]:
    return [(e.kind, e.step) for e in _records(job) if e.kind in ("start", "resume", "preempted", "end", "failure")]


def _key(setup: dict[str, Any]) -> Any:
    return Settings(data_dir=setup["root"] / "data").signer().public


def _committed(setup: dict[str, Any], job: Path) -> list[int]:
    """Steps of the checkpoints whose signed manifest checks out."""
    return [info.step for info in trusted(JobStore.folder(job), _key(setup))]


def _assert_same_as_reference(job: Path, reference: Path) -> None:
    """Every step's figures, every evaluation and every final weight equal the uninterrupted run's."""
    ref, got = _train(reference), _train(job)
    assert sorted(got) == list(range(1, TOTAL_STEPS + 1))
    for step in range(1, TOTAL_STEPS + 1):
        assert _figures(got[step]) == _figures(ref[step]), f"step {step}: {got[step]} != {ref[step]}"
    assert _evals(job) == _evals(reference)
    mine, theirs = load_file(job / "final" / "model.safetensors"), load_file(reference / "final" / "model.safetensors")
    assert mine.keys() == theirs.keys()
    different = [name for name in mine if not torch.equal(mine[name], theirs[name])]
    assert not different, f"final weights differ from the uninterrupted run: {different}"
    generation = json.loads((job / "final" / "generation_config.json").read_text(encoding="utf-8"))
    assert generation == json.loads((reference / "final" / "generation_config.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def reference(setup: dict[str, Any]) -> Path:
    """The uninterrupted run."""
    job = setup["root"] / "reference"
    code = _run(setup, job)
    assert code == 0, _log_tail(job)
    losses = [e.loss for e in _train(job).values()]
    assert len(losses) == TOTAL_STEPS and losses[-1] < losses[0]
    assert _events(job) == [("start", 0), ("end", TOTAL_STEPS)]
    assert _committed(setup, job) == [2 * SAVE_EVERY, 3 * SAVE_EVERY]  # keep_checkpoints: 2
    return job


@pytest.fixture(scope="module")
def preempted(setup: dict[str, Any]) -> dict[str, Any]:
    """A job stopped by SIGTERM after step STOP_AT was recorded; kept untouched (tests work on copies)."""
    job = setup["root"] / "preempted"
    code, seen = _interrupt(setup, job, signal.SIGTERM)
    return {"job": job, "code": code, "seen": seen, "log": _log_tail(job)}


def test_sigkill_after_step_k_resumes_to_the_same_loss_curve_and_weights(setup, reference):
    """SIGKILL mid-run loses the steps after the last checkpoint; the same command redoes them identically.

    The resumed job starts from the newest committed checkpoint (a "resume" event at its step),
    redoes the lost steps with the same figures as before the kill, and ends with per-step losses,
    evaluations and final weights equal to the uninterrupted run's.
    """
    job = setup["root"] / "killed"
    code, seen = _interrupt(setup, job, signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert not (job / "final").exists()
    killed_at = _last_step(job)
    assert killed_at >= seen >= STOP_AT
    committed = _committed(setup, job)
    assert committed and committed[-1] < killed_at, (committed, killed_at)  # work after it was lost
    resume_from = committed[-1]

    assert _run(setup, job) == 0, _log_tail(job)

    assert _events(job) == [("start", 0), ("resume", resume_from), ("end", TOTAL_STEPS)]
    steps = [e.step for e in _records(job) if e.kind == "step"]
    assert steps == list(range(1, killed_at + 1)) + list(range(resume_from + 1, TOTAL_STEPS + 1))
    _assert_same_as_reference(job, reference)


def test_sigterm_checkpoints_the_step_reached_exits_75_and_resumes(setup, reference, preempted):
    """SIGTERM makes the job finish its step, checkpoint it, log "preempted" and exit 75; rerunning completes it."""
    assert preempted["code"] == EXIT_PREEMPTED, preempted["log"]
    src = preempted["job"]
    stopped = _last_step(src)
    assert STOP_AT <= preempted["seen"] <= stopped < TOTAL_STEPS
    assert _events(src) == [("start", 0), ("preempted", stopped), ("end", stopped)]
    end = _records(src)[-1]
    assert end.kind == "end" and end.summary.preempted and end.summary.final is None
    assert _committed(setup, src)[-1] == stopped  # nothing is lost: the checkpoint is at the step reached
    assert f"stopped at step {stopped} after a checkpoint" in preempted["log"]
    assert not (src / "final").exists()
    job = setup["root"] / "preempted-resumed"
    shutil.copytree(src, job)

    assert _run(setup, job) == 0, _log_tail(job)

    events = [("start", 0), ("preempted", stopped), ("end", stopped), ("resume", stopped), ("end", TOTAL_STEPS)]
    assert _events(job) == events
    steps = [e.step for e in _records(job) if e.kind == "step"]
    assert steps == list(range(1, TOTAL_STEPS + 1))  # no step done twice
    _assert_same_as_reference(job, reference)


def test_a_checkpoint_cut_off_before_its_marker_is_ignored(setup, reference, preempted):
    """Resume skips checkpoints without a valid manifest and continues from the newest complete one.

    On a copy of the preempted job: the newest committed checkpoint loses its manifest (an upload
    cut off before the commit), and a later step is left as a folder of uploaded files with no
    manifest. Resume starts from the previous complete checkpoint, says which it passed over,
    reaches the uninterrupted run's result, and the next commit removes the leftovers.
    """
    assert preempted["code"] == EXIT_PREEMPTED, preempted["log"]
    job = setup["root"] / "cut-off"
    shutil.copytree(preempted["job"], job)
    committed = _committed(setup, job)
    assert len(committed) == 2, committed
    previous, newest = committed
    cut = job / "checkpoints" / f"step-{newest:09d}"
    leftover = cut.parent / f"step-{newest + 1:09d}"
    shutil.copytree(cut, leftover)
    (leftover / MARKER).unlink()
    (cut / MARKER).unlink()
    assert _committed(setup, job) == [previous]

    assert _run(setup, job) == 0, _log_tail(job)

    assert _events(job)[-2:] == [("resume", previous), ("end", TOTAL_STEPS)]
    resume = [e for e in _records(job) if e.kind == "resume"][-1]
    assert [r.split(":")[0] for r in resume.refused] == [leftover.name, cut.name]
    assert all("no COMMITTED.json: cut off before its commit" in r for r in resume.refused)
    names = [name for _, name in list_steps(JobStore.folder(job))]
    assert leftover.name not in names  # written again when the run reached it, or pruned after the next commit
    assert prune(JobStore.folder(job), 2, _key(setup)) == []  # nothing untrusted is left
    _assert_same_as_reference(job, reference)


# ----------------------------------------------------------------------------- planted checkpoints


def _pickle_that_runs(command: str) -> bytes:
    """What a hostile tenant would put in a checkpoint: unpickling it runs ``command``."""
    import pickle

    class Payload:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.system, (command,))

    return pickle.dumps(Payload())


def _plant(folder: Path, payload: bytes, *, signature: str) -> None:
    """Swap a checkpoint's DeepSpeed state for ``payload`` and make its manifest list it again.

    ``signature``: "keep" (the old signature, now over other content), "drop" (unsigned).
    """
    state = folder / "deepspeed" / "mp_rank_00_model_states.pt"
    state.parent.mkdir(parents=True, exist_ok=True)
    state.write_bytes(payload)
    path = folder / MARKER
    marker = json.loads(path.read_text()) if path.exists() else {"format_version": 2, "kind": "checkpoint", "files": {}}
    marker["files"]["deepspeed/mp_rank_00_model_states.pt"] = {"size": len(payload), "sha256": "0" * 64}
    if signature == "drop":
        marker.pop("signature", None)
    path.write_text(json.dumps(marker))


def test_planted_checkpoints_are_refused_by_name_and_never_unpickled(setup, reference):
    """A pickle that would run code, behind a re-digested manifest, an unsigned one and a hand-made folder:
    each is refused by name, nothing of it is unpickled, and the job goes on from the newest checkpoint
    it can trust (and says so), or starts over when there is none."""
    sentinel = setup["root"] / "pwned"
    payload = _pickle_that_runs(f"touch {sentinel}")
    previous, newest = _committed(setup, reference)

    job = setup["root"] / "planted"
    shutil.copytree(reference, job)
    shutil.rmtree(job / "final")
    _plant(job / "checkpoints" / f"step-{newest:09d}", payload, signature="keep")
    _plant(job / "checkpoints" / "step-000000099", payload, signature="drop")
    assert _run(setup, job) == 0, _log_tail(job)
    resume = [e for e in _records(job) if e.kind == "resume"][-1]
    assert resume.checkpoint == f"step-{previous:09d}" and f"from checkpoint step-{previous:09d}" in resume.detail
    assert [r.split(":")[0] for r in resume.refused] == ["step-000000099", f"step-{newest:09d}"]
    assert "unsigned" in resume.refused[0] and "signature does not match its content" in resume.refused[1]
    _assert_same_as_reference(job, reference)

    job = setup["root"] / "planted-everywhere"
    shutil.copytree(reference, job)
    shutil.rmtree(job / "final")
    for step in (previous, newest):
        _plant(job / "checkpoints" / f"step-{step:09d}", payload, signature="drop")
    assert _run(setup, job) == 0, _log_tail(job)
    start = _records(job)[len(_records(reference))]
    assert start.kind == "start" and "starting over: no trustworthy checkpoint" in start.detail
    assert all(f"step-{s:09d}: COMMITTED.json is unsigned" in start.detail for s in (previous, newest))
    assert not sentinel.exists(), "a planted pickle was unpickled"
    mine, theirs = load_file(job / "final" / "model.safetensors"), load_file(reference / "final" / "model.safetensors")
    assert all(torch.equal(mine[name], theirs[name]) for name in theirs)


# ----------------------------------------------------------------------------- SIGKILL at random moments

KILL_SEEDS = (11, 13)


def _partial_uploads(job: Path) -> list[str]:
    """Checkpoint folders in the job's store that have files but no manifest yet (an upload under way)."""
    return [f.name for f in (job / "checkpoints").glob("step-*") if not (f / MARKER).exists()] if job.exists() else []


def _checkpoint_in_flight(setup: dict[str, Any], job: Path) -> bool:
    """A checkpoint is being written: DeepSpeed's files in the rank's scratch, or an upload without its manifest."""
    scratch = setup["root"] / "data" / "scratch" / job.name / "rank-0"
    return any(scratch.glob("checkpoint-step-*")) or bool(_partial_uploads(job))


def _kill_randomly(setup: dict[str, Any], job: Path, rng: Any, in_checkpoint: bool) -> dict[str, Any]:
    """Start the job and SIGKILL it after a random step: at a random moment, or within a few
    milliseconds of a checkpoint being seen in flight (written, hashed or uploaded)."""
    proc = _start(setup, job)
    deadline = time.monotonic() + RUN_TIMEOUT
    target = rng.randint(1, TOTAL_STEPS - 2)
    delay = rng.uniform(0.0, 0.01) if in_checkpoint else rng.uniform(0.0, 0.4)
    seen_in_flight = False
    while proc.poll() is None and time.monotonic() < deadline:
        if _last_step(job) >= target and (not in_checkpoint or (seen_in_flight := _checkpoint_in_flight(setup, job))):
            time.sleep(delay)
            break
        time.sleep(0.0005)
    if proc.poll() is not None:
        return {"finished": True, "code": proc.returncode}
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return {"finished": False, "step": _last_step(job), "seen_in_flight": seen_in_flight,
            "partial_upload": _partial_uploads(job)}  # fmt: skip


def test_sigkill_at_random_moments_always_resumes_from_a_complete_checkpoint(setup, reference):
    """Over several seeds, a job saving a checkpoint after every step is killed twice (once at a random
    moment, once while a checkpoint is being written or uploaded), then run to its end: it always resumes
    from a complete checkpoint, and ends with the uninterrupted run's weights."""
    import random

    every_step = yaml.safe_load(setup["recipe"].read_text(encoding="utf-8"))
    every_step["training"]["save_every_steps"] = 1
    recipe = setup["root"] / "every-step.yaml"
    recipe.write_text(yaml.safe_dump(every_step, allow_unicode=True), encoding="utf-8")
    kills, lines = [], []
    for seed in KILL_SEEDS:
        rng = random.Random(seed)
        job = setup["root"] / f"random-kills-{seed}"
        for in_checkpoint in rng.sample([False, True], 2):
            outcome = _kill_randomly({**setup, "recipe": recipe}, job, rng, in_checkpoint)
            kills.append({"seed": seed, "aimed": in_checkpoint, **outcome})
        assert _run({**setup, "recipe": recipe}, job) == 0, _log_tail(job)
        resumes = [e for e in _records(job) if e.kind == "resume"]
        trusted = set(_committed(setup, job))
        for resume in resumes:  # each resume named a complete checkpoint, or passed over incomplete ones only
            assert all("cut off before its commit" in r for r in resume.refused), resume.refused
        assert trusted and max(trusted) == TOTAL_STEPS
        mine = load_file(job / "final" / "model.safetensors")
        theirs = load_file(reference / "final" / "model.safetensors")
        assert all(torch.equal(mine[name], theirs[name]) for name in theirs), f"seed {seed}: other final weights"
        lines.append(f"seed {seed}: resumed at {[e.step for e in resumes]}, refused {[e.refused for e in resumes]}")
    print("\n" + "\n".join(lines + [str(k) for k in kills]))
    killed = [k for k in kills if not k["finished"]]
    assert len(killed) >= len(kills) - 1, kills
    assert any(k["seen_in_flight"] for k in killed), f"no kill was aimed at a checkpoint being written: {kills}"


def test_sigkill_during_uploads_to_s3_never_leaves_a_checkpoint_that_is_taken_for_complete(
    setup, reference, s3_storage
):
    """The same job, its store in a tenant bucket on the S3 server on loopback, run as one worker by the
    driver: killed while checkpoint files are on their way to the bucket (its manifest not yet written),
    each resume passes over the cut-off upload by name, and the end is the uninterrupted run's weights."""
    import random
    import tempfile

    from finetune.registry import Registry
    from finetune.train.launch import plan_job
    from finetune.validate import load_recipe

    config = s3_storage()
    store = JobStore(Bucket(config, "t1", "2026q1"), "jobs/s3-kills", "s3-kills")
    settings = Settings(data_dir=setup["root"] / "data", events_flush_seconds=0.001)
    every_step = yaml.safe_load(setup["recipe"].read_text(encoding="utf-8"))
    every_step["training"]["save_every_steps"] = 1
    recipe = load_recipe_text(every_step, setup["root"] / "every-step-s3.yaml", load_recipe)
    registry = Registry.load(settings.registry, settings.lock_path)
    spec, _ = plan_job(recipe, Bucket.folder(setup["bucket"]), store, settings, registry=registry)
    spec_file = setup["root"] / "s3-spec.json"
    spec_file.write_text(spec.model_dump_json(), encoding="utf-8")
    env = {**setup["env"], "FINETUNE_S3_ACCESS_KEY_ID": config.access_key_id or "",
           "FINETUNE_S3_SECRET_ACCESS_KEY": config.secret_access_key or ""}  # fmt: skip
    command = [sys.executable, "-m", "workers.driver", str(spec_file), "--local"]

    seen = {"seq": 0, "step": 0}

    def last_step() -> int:  # incremental: only the segments published since the last look are read
        for event in read_events(store.bucket, store.prefix, after=seen["seq"]):
            seen["seq"] = event.seq
            if event.kind == "step":
                seen["step"] = max(seen["step"], event.step)
        return seen["step"]

    def partial(at_least: int) -> list[str]:  # one listing: checkpoint folders whose manifest is not written yet
        root = store.path("checkpoints") + "/"
        files = [name[len(root) :].split("/", 1) for name, _ in store.bucket.walk_files(store.path("checkpoints"))]
        folders = {folder for folder, _ in files}
        done = {folder for folder, name in files if name == MARKER}
        return sorted(f for f in folders - done if int(f.split("-")[1]) >= at_least)

    rng, cut = random.Random(5), []
    for _ in range(3):  # each run killed during the upload of a checkpoint after a step it had not reached
        target = min(TOTAL_STEPS, last_step() + rng.randint(1, 3))
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + RUN_TIMEOUT
        while proc.poll() is None and time.monotonic() < deadline:
            if last_step() >= target and partial(target):
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.002)  # the S3 server answers from this process: leave it the interpreter
        proc.wait()
        cut += partial(target)  # after SIGKILL nothing more is written: these uploads were cut off
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    resumes = [e for e in read_events(store.bucket, store.prefix) if e.kind == "resume"]
    refused = [r.split(":")[0] for e in resumes for r in e.refused]
    print(f"\nkilled during uploads of {cut}; resumes at {[e.step for e in resumes]} passed over {refused}")
    assert len(set(cut)) >= 2, f"too few kills landed during an upload: {cut}"
    assert set(cut) <= set(refused), (cut, refused)  # every cut-off upload was passed over, by name
    assert all("cut off before its commit" in r for e in resumes for r in e.refused)
    with tempfile.TemporaryDirectory() as tmp:
        rel = store.path("final")
        fetch_folder(store.bucket, rel, read_marker(store.bucket, rel, "final", _key(setup)), Path(tmp))
        mine = load_file(Path(tmp) / "model.safetensors")
    theirs = load_file(reference / "final" / "model.safetensors")
    assert all(torch.equal(mine[name], theirs[name]) for name in theirs)


def load_recipe_text(doc: dict[str, Any], path: Path, load: Any) -> Any:
    path.write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8")
    from finetune.registry import Registry

    settings = Settings()
    return load(path, Registry.load(settings.registry, settings.lock_path))
