"""The job's event log: typed records, JSON lines, segments in a bucket (local and S3)."""

import json
import logging
import math

import pytest
from pydantic import ValidationError

from finetune.events import (
    MAX_LINE_BYTES,
    CheckpointEvent,
    EndEvent,
    ErrorInfo,
    EvalEvent,
    EventLog,
    FailureEvent,
    JobSummary,
    PreemptedEvent,
    ResumeEvent,
    StartEvent,
    StepEvent,
    events_jsonl,
    latest_by_step,
    parse_event,
    parse_jsonl,
    read_events,
    to_jsonl,
)
from finetune.storage import Bucket, PathEscapeError, StorageError

HARDWARE = {"device": "cpu", "world_size": 1, "gpus": []}
PARAMETERS = {"total": 1_000, "trained": 64}


def start(step=0):
    return StartEvent(
        step=step,
        detail="64 of 1,000 parameters trained; 零冗余 ZeRO-0",
        hardware=HARDWARE,
        zero_stage=0,
        parameters=PARAMETERS,
        total_steps=10,
    )


def train_step(step, loss=1.0, grad_norm=0.5, seq=0):
    return StepEvent(
        seq=seq,
        step=step,
        epoch=step / 10,
        lr=1e-4,
        loss=loss,
        trained_tokens=100 * step,
        tokens=100,
        grad_norm=grad_norm,
        step_time=0.1,
        tokens_per_s=1000.0,
        peak_memory=0,
    )


def every_kind():
    return [
        start(),
        ResumeEvent(
            step=4,
            detail="再開 from step 4",
            hardware=HARDWARE,
            zero_stage=2,
            parameters=PARAMETERS,
            total_steps=10,
            checkpoint="step-000004",
            refused=["step-000006: no marker"],
        ),
        train_step(5, grad_norm=math.nan),
        EvalEvent(step=5, eval_loss=1.5, eval_ppl=4.48, eval_tokens=300),
        CheckpointEvent(step=5, name="step-000005", files=3, bytes=12_345, seconds=0.25),
        PreemptedEvent(step=5, reason="signal", detail="SIGTERM"),
        EndEvent(
            step=10,
            summary=JobSummary(
                steps=10,
                preempted=False,
                stopped_early=False,
                final="jobs/j1/final",
                zero_stage=2,
                eval={"eval_loss": 1.2},
            ),
        ),
        FailureEvent(
            step=3,
            error=ErrorInfo(
                type="TrainingError", message="out of memory at step 4", fault="tenant", hint="lower micro_batch_size"
            ),
        ),
    ]


def same(a, b):
    """Equal events, NaN included (nan != nan)."""
    return json.dumps(a.model_dump()) == json.dumps(b.model_dump())


@pytest.fixture
def clock():
    class Clock:
        now = 1_000.0

        def __call__(self):
            return self.now

    return Clock()


@pytest.fixture
def bucket(tmp_path):
    return Bucket.folder(tmp_path / "bucket")


# ----------------------------------------------------------------------------------- records
def test_every_kind_round_trips_through_jsonl():
    events = every_kind()
    data = to_jsonl(events)
    lines = data.decode().splitlines()
    assert len(lines) == len(events) and data.endswith(b"\n")
    assert '"grad_norm":NaN' in lines[2]  # python's json, as the service reads it
    assert "零冗余" in lines[0] and "再開" in lines[1]  # not escaped
    assert lines[0].startswith('{"kind":"start","seq":0,"time":0.0,"step":0,"detail":')  # compact, field order
    back = parse_jsonl(data, source="metrics.jsonl")
    assert [type(e) for e in back] == [type(e) for e in events]
    assert all(same(a, b) for a, b in zip(back, events, strict=True))
    assert math.isnan(back[2].grad_norm)
    assert same(parse_jsonl(data.decode(), source="text")[1], events[1])


def test_parsing_is_discriminated_by_kind():
    assert isinstance(
        parse_event({"kind": "eval", "step": 2, "eval_loss": 1, "eval_ppl": 2.7, "eval_tokens": 9}), EvalEvent
    )
    resumed = parse_event(every_kind()[1].model_dump_json())
    assert isinstance(resumed, ResumeEvent) and not isinstance(resumed, StartEvent)
    assert parse_event(b'{"kind":"preempted","step":3,"reason":"stop requested"}').detail == ""
    with pytest.raises(ValidationError, match="does not match any of the expected tags"):
        parse_event({"kind": "train", "step": 1})
    with pytest.raises(ValidationError, match="Extra inputs"):
        parse_event({"kind": "preempted", "step": 1, "reason": "signal", "surprise": 1})
    with pytest.raises(ValidationError, match="fault"):
        parse_event({"kind": "failure", "step": 1, "error": {"type": "X", "message": "m", "fault": "cosmic rays"}})


def test_bad_lines_are_skipped_with_a_warning(caplog):
    good = to_jsonl([train_step(1), train_step(2)]).decode().splitlines()
    data = (
        "\n".join(
            [
                good[0],
                "{not json",
                '{"kind":"step","step":2}',
                "",
                '{"kind":"event","event":"start","step":0}',
                "[" * 100_000,
                "x" * (MAX_LINE_BYTES + 1),
                good[1],
            ]
        ).encode()
        + b"\n\xff\xfe\n"
    )
    with caplog.at_level(logging.WARNING, logger="finetune.events"):
        events = parse_jsonl(data, source="jobs/j1/events/x.jsonl")
    assert [e.step for e in events] == [1, 2]
    warned = [r.getMessage() for r in caplog.records]
    assert [m.split(": ", 1)[0] for m in warned] == [f"jobs/j1/events/x.jsonl:{n}" for n in (2, 3, 5, 6, 7, 9)]
    assert "epoch: Field required" in warned[1] and f"at most {MAX_LINE_BYTES}" in warned[4]


# ----------------------------------------------------------------------------------- writer and reader
@pytest.mark.parametrize("prefix", ["", "jobs/j1"])
def test_segments_continue_the_sequence_after_a_restart(bucket, clock, prefix):
    log = EventLog(bucket, prefix, clock=clock)
    original = start()
    stamped = log.emit(original)
    assert (stamped.seq, stamped.time) == (1, 1_000.0) and (original.seq, original.time) == (0, 0.0)
    for step in (1, 2, 3):
        log.emit(train_step(step))
    assert log.pending == 3  # steps wait for the next flush
    log.close()
    folder = f"{prefix}/events" if prefix else "events"
    assert bucket.list(folder) == [
        f"{folder}/000000000001-000000000001.jsonl",
        f"{folder}/000000000002-000000000004.jsonl",
    ]

    again = EventLog(bucket, prefix, clock=clock)  # the job resumed after a crash
    assert again.emit(ResumeEvent(**start(2).model_dump(exclude={"kind"}), checkpoint="step-000002")).seq == 5
    again.emit(train_step(3, loss=0.9))
    again.flush()
    again.flush()  # nothing buffered: no empty segment
    assert bucket.list(folder)[2:] == [
        f"{folder}/000000000005-000000000005.jsonl",
        f"{folder}/000000000006-000000000006.jsonl",
    ]

    events = read_events(bucket, prefix)
    assert [e.seq for e in events] == [1, 2, 3, 4, 5, 6]
    assert [e.kind for e in events] == ["start", "step", "step", "step", "resume", "step"]
    assert [(e.step, e.loss) for e in latest_by_step(events, "step")] == [(1, 1.0), (2, 1.0), (3, 0.9)]
    assert latest_by_step(events, "eval") == []
    assert parse_jsonl(events_jsonl(bucket, prefix), source="log") == events


def test_after_skips_segments_without_reading_them(bucket, clock, caplog):
    log = EventLog(bucket, "jobs/j1", clock=clock)
    log.emit(start())
    for step in (1, 2):
        log.emit(train_step(step))
        log.flush()
    log.emit(EvalEvent(step=2, eval_loss=1.0, eval_ppl=2.7, eval_tokens=10))
    log.flush()
    bucket.write_bytes("jobs/j1/events/000000000001-000000000001.jsonl", b"garbage\n")  # read it and it warns
    bucket.write_bytes("jobs/j1/events/notes.txt", b"not a segment")
    bucket.write_bytes("jobs/j1/events/000000000009-000000000002.jsonl", b"backwards")
    reads = []
    real = bucket.read_bytes
    bucket.read_bytes = lambda rel: reads.append(rel) or real(rel)
    with caplog.at_level(logging.WARNING, logger="finetune.events"):
        events = read_events(bucket, "jobs/j1", after=2)
    assert [(e.seq, e.kind) for e in events] == [(3, "step"), (4, "eval")]
    assert reads == ["jobs/j1/events/000000000003-000000000003.jsonl", "jobs/j1/events/000000000004-000000000004.jsonl"]
    assert caplog.records == []
    assert read_events(bucket, "jobs/j1", after=4) == []
    assert [e.seq for e in read_events(bucket, "jobs/j1")] == [2, 3, 4]  # the garbage line skipped
    assert read_events(bucket, "jobs/none") == []


def test_overlapping_segments_keep_the_first_copy_of_each_seq(bucket, caplog):
    first = [train_step(1, seq=1), train_step(2, seq=2)]
    retry = [train_step(1, loss=9.0, seq=1), train_step(2, loss=9.0, seq=2), train_step(3, seq=3)]
    bucket.write_bytes("events/000000000001-000000000003.jsonl", to_jsonl(retry))
    bucket.write_bytes("events/000000000001-000000000002.jsonl", to_jsonl(first))
    stray = train_step(4, seq=7)  # outside the name's range: not trusted
    bucket.write_bytes("events/000000000004-000000000004.jsonl", to_jsonl([stray]))
    with caplog.at_level(logging.WARNING, logger="finetune.events"):
        events = read_events(bucket, "")
    assert [(e.seq, e.loss) for e in events] == [(1, 1.0), (2, 1.0), (3, 1.0)]
    assert "skipped seq 7" in caplog.text
    assert EventLog(bucket, "").emit(train_step(5)).seq == 5


def test_steps_flush_by_time_and_final_kinds_at_once(bucket, clock):
    log = EventLog(bucket, "j", flush_seconds=10.0, clock=clock)
    log.emit(train_step(1))
    clock.now += 9.9
    log.emit(train_step(2))
    assert log.pending == 2 and bucket.list("j/events") == []
    clock.now += 0.1
    log.emit(train_step(3))
    assert log.pending == 0 and bucket.list("j/events") == ["j/events/000000000001-000000000003.jsonl"]
    log.emit(train_step(4))
    log.emit(
        EndEvent(step=4, summary=JobSummary(steps=4, preempted=False, stopped_early=False, final=None, zero_stage=0))
    )
    assert log.pending == 0 and bucket.list("j/events")[-1] == "j/events/000000000004-000000000005.jsonl"
    log.emit(FailureEvent(step=4, error=ErrorInfo(type="OSError", message="disk", fault="platform")))
    assert log.pending == 0 and len(bucket.list("j/events")) == 3


def test_a_failed_write_keeps_events_buffered(bucket, clock, monkeypatch, caplog):
    log = EventLog(bucket, "", clock=clock)
    real = bucket.write_bytes
    broken = True

    def write(rel, data):
        if broken:
            raise StorageError("S3 is down")
        real(rel, data)

    monkeypatch.setattr(bucket, "write_bytes", write)
    with caplog.at_level(logging.ERROR, logger="finetune.events"):
        assert log.emit(start()).seq == 1  # an immediate kind: the flush fails, emit does not raise
    assert "could not publish events 1-1" in caplog.text
    log.emit(train_step(1))
    assert log.pending == 2 and log.flush() is False
    with pytest.raises(StorageError, match="S3 is down"):
        log.flush(raise_errors=True)
    broken = False
    assert log.flush() is True and log.pending == 0
    assert bucket.list("events") == ["events/000000000001-000000000002.jsonl"]
    assert [e.seq for e in read_events(bucket, "")] == [1, 2]


def test_unwritable_events_are_refused_at_emit(bucket, clock):
    log = EventLog(bucket, "", clock=clock)
    with pytest.raises(ValueError, match="cannot be written as JSON"):
        log.emit(
            StartEvent(step=0, detail="", hardware={"device": object()}, zero_stage=0, parameters={}, total_steps=1)
        )
    with pytest.raises(ValueError, match="bytes \\(at most"):
        log.emit(PreemptedEvent(step=0, reason="signal", detail="x" * MAX_LINE_BYTES))
    assert log.emit(start()).seq == 1  # no seq was used up
    with pytest.raises(PathEscapeError):
        EventLog(bucket, "../other", clock=clock)


def test_events_on_s3(s3_storage, clock):
    bucket = Bucket(s3_storage(), "t1", "2026q1")
    log = EventLog(bucket, "jobs/j1", clock=clock)
    log.emit(start())
    log.emit(train_step(1, grad_norm=math.nan))
    log.close()
    again = EventLog(bucket, "jobs/j1", clock=clock)
    assert again.emit(PreemptedEvent(step=1, reason="signal")).seq == 3
    assert bucket.list("jobs/j1/events")[-1] == "jobs/j1/events/000000000003-000000000003.jsonl"
    events = read_events(bucket, "jobs/j1", after=1)
    assert [(e.seq, e.kind) for e in events] == [(2, "step"), (3, "preempted")]
    assert math.isnan(events[0].grad_norm)
