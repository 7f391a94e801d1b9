"""The dispatcher's decisions, without a cluster: admission (first come first served, a tenant at its
limit of GPUs held passed over without holding up others) and the end of retries."""

from __future__ import annotations

from sqlalchemy import select

from finetune.service import admin
from finetune.service.dispatcher import Dispatcher
from finetune.service.history import transition
from finetune.service.ids import new_id
from finetune.service.models import Event, Job


def _job(world, who: str, gpus: int) -> str:
    with world.svc.db() as session, session.begin():
        job = Job(id=new_id("job"), tenant_id=world.tenants[who], term_id=world.term, model_id="m", method="lora",
                  gpus=gpus, recipe={}, state="queued")  # fmt: skip
        session.add(job)
    return job.id


def _states(world, ids: list[str]) -> list[str]:
    with world.svc.db() as session:
        return [session.get(Job, i).state for i in ids]  # type: ignore[union-attr]


def test_admission_is_first_come_first_served_and_one_tenants_limit_holds_up_no_one_else(world) -> None:
    world.svc.settings = world.svc.settings.model_copy(update={"gpu_capacity": 4})
    with world.svc.db() as session, session.begin():  # tenant a may hold 2 GPUs at once; b 4
        admin.grant(session, world.tenants["b"], world.term, gpus_per_job=4, gpus_held=4)
    dispatcher = Dispatcher(world.svc)
    a1, a2, b1, b2 = _job(world, "a", 2), _job(world, "a", 1), _job(world, "b", 1), _job(world, "b", 2)
    dispatcher.admit()
    # a1 takes 2 GPUs; a2 would take a past its 2 GPUs held: passed over; b1 fits; b2 would need 5 of 4: waits
    assert _states(world, [a1, a2, b1, b2]) == ["validating", "queued", "validating", "queued"]
    b3 = _job(world, "b", 1)
    dispatcher.admit()  # b3 fits in the last GPU, but b2 came first and waits for 2: no overtaking
    assert _states(world, [b2, b3]) == ["queued", "queued"]
    with world.svc.db() as session, session.begin():
        job = session.get(Job, a1)
        assert job is not None and job.attempt == 1 and job.submission_id == f"{a1}-1"
        transition(session, job, "failed", reason="test")
    dispatcher.admit()  # a1's GPUs are free: a2 (a's limit allows it now) and b2 start, b3 waits
    assert _states(world, [a2, b2, b3]) == ["validating", "validating", "queued"]


def test_a_job_that_keeps_failing_is_failed_after_its_attempts_with_the_reason(world) -> None:
    world.svc.settings = world.svc.settings.model_copy(update={"gpu_capacity": 4, "max_attempts": 2})
    dispatcher = Dispatcher(world.svc)
    job_id = _job(world, "a", 1)
    dispatcher.admit()
    for expected in ("validating", "failed"):
        with world.svc.db() as session:
            job = session.get(Job, job_id)
            assert job is not None
            dispatcher.retry(session, job, "the driver failed (exit 1)")
        assert _states(world, [job_id]) == [expected]
    with world.svc.db() as session:
        job = session.get(Job, job_id)
        assert job is not None and job.attempt == 2 and job.reason == "attempts_exhausted"
        assert job.error is not None and "exit 1" in job.error["message"]
        kinds = session.scalars(select(Event.kind).where(Event.job_id == job_id).order_by(Event.position)).all()
        assert kinds == ["state", "attempt", "state"]
