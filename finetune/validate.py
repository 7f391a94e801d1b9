"""Validate a recipe file end to end: YAML, schema, cross-field rules, and the model registry.

Every problem is collected and located (``file:line: field.path: message``), so a tenant sees
all of them at once. Nothing here touches the network, the GPU or the tenant's data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from finetune.errors import Issue, RecipeError
from finetune.limits import DEFAULT_LIMITS, Limits, cap_issues
from finetune.origin import Decision, OriginFacts, judge
from finetune.recipe import Recipe, cross_field_issues
from finetune.registry import Registry, Status
from finetune.yamlio import LocatedDoc, load_yaml_located, parse_yaml_located, pydantic_issues, suggest

LIST_HINT = "`finetune models list` shows the approved models"


def model_issues(recipe: Recipe, registry: Registry) -> list[Issue]:
    """Is the recipe's model allowed, known, and able to run the recipe's method and length?"""
    if recipe.model.custom is not None:
        # A declaration can only be refused here: what lets a custom model train is an operator's
        # approved review of its files, checked when the model is loaded (finetune.reviews).
        from finetune.origin import entity_is_denied

        custom = recipe.model.custom
        verdict = judge(OriginFacts(developer=custom.developer, country=custom.country))
        if verdict.decision is not Decision.DENY:
            return []
        where = "model.custom.developer" if entity_is_denied(custom.developer) else "model.custom.country"
        return [Issue(where, "this model is not allowed on this platform: " + "; ".join(verdict.reasons))]
    model_id = recipe.model.id
    if model_id is None:
        return []
    entry = registry.get(model_id)
    if entry is None:
        return [unknown_model_issue(model_id, registry)]
    if entry.status is Status.DENIED:
        what = "family" if entry.kind == "family" else "model"
        return [Issue("model.id", f"{what} '{model_id}' is not allowed on this platform: {entry.reason}")]
    if entry.status is Status.PENDING:
        return [
            Issue(
                "model.id", f"model '{model_id}' is waiting for origin review and cannot be trained yet: {entry.reason}"
            )
        ]
    issues = []
    if recipe.method.type not in entry.methods:
        allowed = ", ".join(entry.methods)
        issues.append(
            Issue("method.type", f"'{recipe.method.type}' is not offered for '{model_id}' (allowed: {allowed})")
        )
    limit = entry.max_seq_len
    if limit is not None and recipe.data.max_seq_len > limit:
        issues.append(
            Issue("data.max_seq_len", f"'{model_id}' handles at most {limit} tokens (got {recipe.data.max_seq_len})")
        )
    return issues


def unknown_model_issue(model_id: str, registry: Registry) -> Issue:
    if "/" in model_id:
        matches = registry.find_repo(model_id)
        denied = [e for e in matches if e.status is Status.DENIED]
        if denied:
            return Issue("model.id", f"'{model_id}' is not allowed on this platform: {denied[0].reason}")
        approved = [e for e in matches if e.status is Status.APPROVED]
        if approved:
            return Issue("model.id", f"unknown model '{model_id}'", hint=f"use the registry id '{approved[0].id}'")
    close = suggest(model_id, [e.id for e in registry.by_status(Status.APPROVED)])
    hint = f"did you mean '{close}'? {LIST_HINT}" if close else LIST_HINT
    return Issue("model.id", f"unknown model '{model_id}'", hint=hint)


def _locate(issues: list[Issue], doc: LocatedDoc) -> list[Issue]:
    located = []
    for issue in issues:
        loc: tuple[str | int, ...] = tuple(issue.path.split(".")) if issue.path else ()
        line = issue.line if issue.line is not None else doc.line_of(loc)
        located.append(Issue(issue.path, issue.message, file=doc.file, line=line, hint=issue.hint))
    return located


def validate_document(
    doc: LocatedDoc, registry: Registry, limits: Limits = DEFAULT_LIMITS
) -> tuple[Recipe | None, list[Issue]]:
    """Validate an already parsed document.

    Returns:
        The recipe (None if invalid) and its issues: the first ``limits.max_issues``, then one
        :class:`~finetune.limits.MoreProblems` line counting the rest, if there are more.
    """
    recipe, issues = _validate_document(doc, registry, limits)
    return recipe, cap_issues(issues, limits)


def _validate_document(doc: LocatedDoc, registry: Registry, limits: Limits) -> tuple[Recipe | None, list[Issue]]:
    if doc.issues:
        return None, doc.issues
    data: Any = doc.data
    if not isinstance(data, dict):
        kind = "a list" if isinstance(data, list) else repr(data)
        return None, [
            Issue("", f"a recipe is a mapping of settings (model:, data:, ...), got {kind}", file=doc.file, line=1)
        ]
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        return None, pydantic_issues(exc, doc, Recipe, limits=limits)
    issues = _locate(cross_field_issues(recipe) + model_issues(recipe, registry), doc)
    return (recipe if not issues else None), issues


def validate_text(
    text: str, registry: Registry, file: str | None = None, limits: Limits = DEFAULT_LIMITS
) -> tuple[Recipe | None, list[Issue]]:
    """Validate untrusted recipe text (an API request body, say) within ``limits``."""
    return validate_document(parse_yaml_located(text, file, limits), registry, limits)


def validate_file(path: Path, registry: Registry, limits: Limits = DEFAULT_LIMITS) -> tuple[Recipe | None, list[Issue]]:
    """Validate an untrusted recipe file within ``limits``; no more than the size limit is read."""
    return validate_document(load_yaml_located(path, limits), registry, limits)


def load_recipe(path: Path, registry: Registry, limits: Limits = DEFAULT_LIMITS) -> Recipe:
    """Load a recipe file or raise :class:`RecipeError` listing its problems (the first
    ``limits.max_issues``, then a count of the rest)."""
    recipe, issues = validate_file(path, registry, limits)
    if recipe is None:
        raise RecipeError(issues, f"recipe {path} is not valid")
    return recipe


def environment_issues(recipe: Recipe, *, cuda_available: bool, devices: int) -> list[Issue]:
    """Run-time checks, made before any work starts on the machine that will run the job."""
    issues = []
    if recipe.method.type == "qlora" and not cuda_available:
        issues.append(
            Issue(
                "method.type",
                "QLoRA needs a CUDA GPU (4-bit kernels); none is available here",
                hint="use method lora on this machine, or run on a GPU",
            )
        )
    if cuda_available and recipe.resources.gpus > devices:
        issues.append(Issue("resources.gpus", f"asks for {recipe.resources.gpus} GPUs but this machine has {devices}"))
    return issues
