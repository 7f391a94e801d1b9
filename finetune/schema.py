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


def _without_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    return value


def _plain_optionals(node: Any) -> Any:
    """``anyOf [X, null]`` with ``default: null`` becomes X, not required and without a default.

    Form libraries render ``anyOf`` as a choice between unnamed options and hide the input until
    one is picked; an optional setting is better shown as its input, left empty when unset.
    Section defaults lose their null members for the same reason.
    """
    if isinstance(node, list):
        return [_plain_optionals(v) for v in node]
    if not isinstance(node, dict):
        return node
    node = {k: _plain_optionals(v) for k, v in node.items()}
    options = node.get("anyOf")
    if (
        isinstance(options, list)
        and len(options) == 2
        and {"type": "null"} in options
        and node.get("default", 0) is None
    ):
        (kept,) = [o for o in options if o != {"type": "null"}]
        node = {**{k: v for k, v in node.items() if k not in ("anyOf", "default")}, **kept}
    if isinstance(node.get("default"), dict):
        node["default"] = _without_none(node["default"])
    return node


def _plain_discriminator(schema: dict[str, Any]) -> None:
    """Keep only ``propertyName``: ajv's discriminator support refuses ``mapping``."""
    for node in [schema, *schema.get("$defs", {}).values()]:
        for prop in node.get("properties", {}).values():
            if isinstance(prop.get("discriminator"), dict):
                prop["discriminator"] = {"propertyName": prop["discriminator"]["propertyName"]}


def recipe_json_schema() -> dict[str, Any]:
    """The JSON Schema of a recipe, as committed in ``recipes/schema.json``."""
    schema = Recipe.model_json_schema(mode="validation")
    _add_factory_defaults(Recipe, schema, schema.get("$defs", {}))
    schema = _plain_optionals(schema)
    _plain_discriminator(schema)
    return {"$schema": SCHEMA_DIALECT, "$id": SCHEMA_ID, **schema}


def recipe_json_schema_text() -> str:
    return json.dumps(recipe_json_schema(), indent=2, ensure_ascii=False, sort_keys=False) + "\n"
