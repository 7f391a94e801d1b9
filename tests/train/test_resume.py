"""A job interrupted by SIGKILL or SIGTERM resumes to exactly the uninterrupted run; cut-off checkpoints are ignored.

Every run here is a real ``python -m finetune.cli train`` process (full fine-tuning of a tiny
random-weight SmolLM2-architecture model on CPU) in the same environment, so the reference run
and the interrupted ones differ only in being interrupted. The comparison is exact: per-step
losses, gradient norms, learning rates and evaluation losses, and every tensor of the final
safetensors weights.

Timing: the processes are stopped when ``metrics.jsonl`` shows step :data:`STOP_AT`, between the
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

from finetune.train.checkpoint_files import MARKER, list_step_dirs, step_dir, verify
from finetune.train.metrics import read_metrics

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


def _last_step(job: Path) -> int:
    """The highest training step recorded so far (0 when none; a line being written is skipped)."""
    path = job / "metrics.jsonl"
    if not path.exists():
        return 0
    step = 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("kind") == "train":
            step = max(step, int(record["step"]))
    return step


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


def _train(job: Path) -> dict[int, dict[str, Any]]:
    """Step -> train record; when a step was recorded twice (lost, then redone) the records must agree."""
    out: dict[int, dict[str, Any]] = {}
    for record in read_metrics(job / "metrics.jsonl"):
        if record["kind"] == "train":
            if record["step"] in out:
                assert _figures(out[record["step"]]) == _figures(record), f"step {record['step']} redone differently"
            out[record["step"]] = record
    return out


def _figures(record: dict[str, Any]) -> tuple[Any, ...]:
    return record["loss"], record["grad_norm"], record["lr"], record["trained_tokens"], record["epoch"]


def _evals(job: Path) -> dict[int, float]:
    return {r["step"]: r["eval_loss"] for r in read_metrics(job / "metrics.jsonl") if r["kind"] == "eval"}


def _events(job: Path) -> list[tuple[str, int]]:
    return [(r["event"], r["step"]) for r in read_metrics(job / "metrics.jsonl") if r["kind"] == "event"]


def _committed(job: Path) -> list[int]:
    return [step for step, folder in list_step_dirs(job) if not verify(folder)]


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
    losses = [r["loss"] for r in _train(job).values()]
    assert len(losses) == TOTAL_STEPS and losses[-1] < losses[0]
    assert _events(job) == [("start", 0), ("end", TOTAL_STEPS)]
    assert _committed(job) == [2 * SAVE_EVERY, 3 * SAVE_EVERY]  # keep_checkpoints: 2
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
    committed = _committed(job)
    assert committed and committed[-1] < killed_at, (committed, killed_at)  # work after it was lost
    resume_from = committed[-1]

    assert _run(setup, job) == 0, _log_tail(job)

    assert _events(job) == [("start", 0), ("resume", resume_from), ("end", TOTAL_STEPS)]
    steps = [r["step"] for r in read_metrics(job / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == list(range(1, killed_at + 1)) + list(range(resume_from + 1, TOTAL_STEPS + 1))
    _assert_same_as_reference(job, reference)


def test_sigterm_checkpoints_the_step_reached_exits_75_and_resumes(setup, reference, preempted):
    """SIGTERM makes the job finish its step, checkpoint it, log "preempted" and exit 75; rerunning completes it."""
    assert preempted["code"] == EXIT_PREEMPTED, preempted["log"]
    src = preempted["job"]
    stopped = _last_step(src)
    assert STOP_AT <= preempted["seen"] <= stopped < TOTAL_STEPS
    assert _events(src) == [("start", 0), ("preempted", stopped), ("end", stopped)]
    end = [r for r in read_metrics(src / "metrics.jsonl") if r["kind"] == "event"][-1]
    assert json.loads(end["detail"])["preempted"] is True and json.loads(end["detail"])["final"] is None
    assert _committed(src)[-1] == stopped  # nothing is lost: the checkpoint is at the step reached
    assert f"stopped at step {stopped} after a checkpoint" in preempted["log"]
    assert not (src / "final").exists()
    job = setup["root"] / "preempted-resumed"
    shutil.copytree(src, job)

    assert _run(setup, job) == 0, _log_tail(job)

    events = [("start", 0), ("preempted", stopped), ("end", stopped), ("resume", stopped), ("end", TOTAL_STEPS)]
    assert _events(job) == events
    steps = [r["step"] for r in read_metrics(job / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == list(range(1, TOTAL_STEPS + 1))  # no step done twice
    _assert_same_as_reference(job, reference)


def test_a_checkpoint_cut_off_before_its_marker_is_ignored(setup, reference, preempted):
    """Resume skips checkpoints without a valid marker and continues from the newest complete one.

    On a copy of the preempted job: the newest committed checkpoint loses its marker (cut off
    before the commit), and a later step is left as a ``.tmp-step-*`` folder holding a complete
    copy with its marker (a crash between the marker and the rename). Resume starts from the
    previous complete checkpoint, reaches the uninterrupted run's result, and the next commit
    removes both leftovers.
    """
    assert preempted["code"] == EXIT_PREEMPTED, preempted["log"]
    job = setup["root"] / "cut-off"
    shutil.copytree(preempted["job"], job)
    committed = _committed(job)
    assert len(committed) == 2, committed
    previous, newest = committed
    cut = step_dir(job, newest)
    leftover = cut.parent / f".tmp-step-{newest + 1:09d}-12345"
    shutil.copytree(cut, leftover)
    (cut / MARKER).unlink()
    assert _committed(job) == [previous]

    assert _run(setup, job) == 0, _log_tail(job)

    assert _events(job)[-2:] == [("resume", previous), ("end", TOTAL_STEPS)]
    assert f"ignoring checkpoint {cut}: no {MARKER} (cut off before its commit)" in _log_tail(job, chars=10**6)
    assert not leftover.exists() and not (cut.exists() and verify(cut))  # cleaned up after the next commit
    _assert_same_as_reference(job, reference)
