"""What the recipe form needs: the approved models, the recipe's JSON Schema, validation."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends

from finetune.registry import Status
from finetune.schema import recipe_json_schema
from finetune.service.errors import IssueOut
from finetune.service.schemas import ModelOut, ValidationOut
from finetune.service.scope import Caller, Svc, caller
from finetune.validate import validate_text

router = APIRouter(prefix="/v1", tags=["catalog"])

RECIPE_BODY = Body(
    media_type="application/yaml",
    description="The recipe as YAML (or JSON, which is YAML too).",
    openapi_examples={
        "quickstart": {"value": "model:\n  id: smollm2-135m-instruct\ndata:\n  path: data/train.jsonl\n"}
    },
)


@router.get("/models", response_model=list[ModelOut], summary="Approved models, for the recipe form")
def list_models(svc: Svc, _who: Annotated[Caller, Depends(caller)]) -> list[ModelOut]:
    out = []
    for entry in svc.registry.by_status(Status.APPROVED):
        summary = entry.summary()
        out.append(ModelOut(
            id=entry.id, name=entry.name, developer=entry.developer.entity, country=entry.developer.country,
            license=entry.license, parameters=entry.params_b, methods=list(entry.methods),
            max_seq_len=entry.max_seq_len, summary=summary,
        ))  # fmt: skip
    return out


@router.get("/recipes/schema", summary="The recipe's JSON Schema (the form is generated from it)")
def get_schema(_who: Annotated[Caller, Depends(caller)]) -> dict[str, Any]:
    return recipe_json_schema()


@router.post("/recipes/validate", response_model=ValidationOut, summary="Check a recipe without running it")
def validate_recipe(
    svc: Svc, _who: Annotated[Caller, Depends(caller)], body: Annotated[str, RECIPE_BODY]
) -> ValidationOut:
    recipe, issues = validate_text(body, svc.registry, "recipe", svc.engine.recipe_limits)
    return ValidationOut(
        valid=recipe is not None,
        issues=[IssueOut.model_validate(i.as_dict()) for i in issues],
        recipe=recipe.model_dump(mode="json") if recipe else None,
    )
