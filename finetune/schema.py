"""The recipe's JSON Schema (2020-12), generated from :class:`finetune.recipe.Recipe`.

The platform UI builds its form from this schema, so every setting carries a title, a
description, its bounds and its default. Sections that default to "all defaults" get an explicit
default object, which form libraries use to pre-fill nested fields.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

from finetune.recipe import Recipe

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
SCHEMA_ID = "https://finetune.invalid/schemas/recipe-v1.json"


def _add_factory_defaults(model: type[BaseModel], schema: dict[str, Any], defs: dict[str, Any]) -> None:
    props = schema.get("properties", {})
    for name, info in model.model_fields.items():
        prop = props.get(name)
        if prop is None:
            continue
        if info.default_factory is not None and "default" not in prop:
            value = info.default_factory()  # type: ignore[call-arg]
            prop["default"] = value.model_dump(mode="json") if isinstance(value, BaseModel) else value
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            ref = prop.get("$ref", "")
            sub = defs.get(ref.rsplit("/", 1)[-1]) if ref else None
            if sub is not None:
                _add_factory_defaults(annotation, sub, defs)


def recipe_json_schema() -> dict[str, Any]:
    """The JSON Schema of a recipe, as committed in ``recipes/schema.json``."""
    schema = Recipe.model_json_schema(mode="validation")
    _add_factory_defaults(Recipe, schema, schema.get("$defs", {}))
    return {"$schema": SCHEMA_DIALECT, "$id": SCHEMA_ID, **schema}


def recipe_json_schema_text() -> str:
    return json.dumps(recipe_json_schema(), indent=2, ensure_ascii=False, sort_keys=False) + "\n"
