"""Jobs as the API makes them: a recipe checked against the registry, the grant and the bucket."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from finetune.errors import Issue
from finetune.recipe import Recipe
from finetune.service.errors import ApiError
from finetune.service.history import add_events
from finetune.service.ids import new_id
from finetune.service.models import Job
from finetune.service.schemas import JobOut, OpsJobOut
from finetune.service.scope import TenantScope
from finetune.validate import validate_document
from finetune.yamlio import parse_yaml_located

RECIPE_FILE = "recipe"  # how the request body is named in located issues


def check_recipe(scope: TenantScope, text: str) -> Recipe:
    """The request body as a valid recipe that this tenant may run now.

    Raises:
        ApiError: 422 with every located issue (syntax, fields, model, grant, dataset).
    """
    limits = scope.svc.engine.recipe_limits
    doc = parse_yaml_located(text, RECIPE_FILE, limits)
    recipe, issues = validate_document(doc, scope.svc.registry, limits)
    if recipe is None:
        raise ApiError(422, "the recipe is not valid", issues=issues)
    problems = []
    if recipe.resources.gpus > scope.grant.gpus_per_job:
        problems.append(Issue("resources.gpus", f"asks for {recipe.resources.gpus} GPUs; your grant allows "
                              f"{scope.grant.gpus_per_job} per job", file=RECIPE_FILE,
                              line=doc.lines.get(("resources", "gpus")),
                              hint=f"set resources.gpus to {scope.grant.gpus_per_job} or fewer"))  # fmt: skip
    for label, path in (("data.path", recipe.data.path), ("data.eval.path", recipe.data.eval.path)):
        if path and not scope.bucket.exists(path):
            where = ("data", "path") if label == "data.path" else ("data", "eval", "path")
            hint = "upload it first (PUT /v1/datasets/upload)"
            message = f"'{path}' is not in your bucket"
            problems.append(Issue(label, message, file=RECIPE_FILE, line=doc.lines.get(where), hint=hint))
    if problems:
        first = problems[0]
        message = first.message if len(problems) == 1 else "the recipe cannot run with your grant and bucket"
        raise ApiError(422, message, param=first.path, issues=problems)
    return recipe


def request_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def create_job(scope: TenantScope, text: str, *, idempotency_key: str | None = None,
               cloned_from: str | None = None) -> tuple[Job, bool]:  # fmt: skip
    """A new queued job from recipe text; with an idempotency key already used by the same request,
    the job made then (and False).

    Raises:
        ApiError: 422 for a bad recipe; 409 when the key was used for a different request.
    """
    digest = request_digest(text)
    if idempotency_key is not None:
        if len(idempotency_key) > 255 or not idempotency_key.isprintable():
            raise ApiError(422, "Idempotency-Key is at most 255 printable characters", param="Idempotency-Key")
        found = _by_key(scope, idempotency_key, digest)
        if found is not None:
            return found, False
    recipe = check_recipe(scope, text)
    job = scope.add(Job(
        id=new_id("job"), name=recipe.name, model_id=recipe.model.id or "custom", method=recipe.method.type,
        gpus=recipe.resources.gpus, recipe=recipe.model_dump(mode="json"), state="queued", attempt=0,
        idempotency_key=idempotency_key, request_sha256=digest, cloned_from=cloned_from,
    ))  # fmt: skip
    try:
        scope.session.flush()
    except IntegrityError:  # the same key, created by a concurrent request
        scope.session.rollback()
        found = _by_key(scope, idempotency_key or "", digest)
        if found is None:
            raise
        return found, False
    add_events(scope.session, job, [("state", {"state": "queued", "from": None}, None, job.created_at)])
    scope.session.commit()
    return job, True


def _by_key(scope: TenantScope, key: str, digest: str) -> Job | None:
    from finetune.service.models import Job as JobRow

    found = scope.session.scalar(
        select(JobRow).where(JobRow.tenant_id == scope.tenant_id, JobRow.idempotency_key == key)
    )
    if found is not None and found.request_sha256 != digest:
        raise ApiError(409, "this Idempotency-Key was used for a different request", param="Idempotency-Key",
                       code="idempotency_conflict")  # fmt: skip
    return found


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7396 JSON merge patch."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def clone_text(job: Job, changes: dict[str, Any]) -> str:
    """The recipe of a clone: the source's recipe with ``changes`` merged in, as JSON text."""
    recipe = merge_patch(job.recipe, changes)
    if isinstance(recipe, dict) and "name" not in changes and recipe.get("name"):
        recipe.pop("name")  # a clone is a new job: its outputs do not reuse the source's name
    return json.dumps(recipe, ensure_ascii=False)


def queue_position(scope_session: Any, job: Job) -> int | None:
    if job.state != "queued":
        return None
    ahead = scope_session.scalar(select(func.count()).select_from(Job).where(Job.state == "queued", Job.id < job.id))
    return int(ahead or 0) + 1


def job_out(job: Job, *, position: int | None = None, warnings: list[str] | None = None) -> JobOut:
    return JobOut(
        id=job.id, name=job.name, model_id=job.model_id, method=job.method, gpus=job.gpus, state=job.state,
        reason=job.reason, error=job.error, attempt=job.attempt, queue_position=position, created_at=job.created_at,
        validating_at=job.validating_at, started_at=job.started_at, finished_at=job.finished_at,
        cancel_requested_at=job.cancel_requested_at, step=job.step, total_steps=job.total_steps, loss=job.loss,
        eval_loss=job.eval_loss, tokens_per_s_per_gpu=job.tokens_per_s_per_gpu, cloned_from=job.cloned_from,
        recipe=job.recipe, warnings=warnings or [],
    )  # fmt: skip


def ops_job_out(job: Job) -> OpsJobOut:
    return OpsJobOut(
        id=job.id, tenant_id=job.tenant_id, model_id=job.model_id, method=job.method, gpus=job.gpus, state=job.state,
        reason=job.reason, attempt=job.attempt, created_at=job.created_at, started_at=job.started_at,
        finished_at=job.finished_at, step=job.step, total_steps=job.total_steps,
        tokens_per_s_per_gpu=job.tokens_per_s_per_gpu,
    )  # fmt: skip
