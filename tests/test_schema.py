"""The recipe JSON Schema: committed copy in sync, valid 2020-12, and complete enough for a form."""

import io
import json
from contextlib import redirect_stdout
from pathlib import Path

import jsonschema
import pytest
import yaml

from finetune.cli import main
from finetune.schema import recipe_json_schema

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "recipes" / "schema.json"


def test_committed_schema_matches_the_recipe_model():
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["schema"]) == 0
    assert out.getvalue() == COMMITTED.read_text(encoding="utf-8"), "run `make schema` and commit recipes/schema.json"


def test_schema_is_valid_json_schema_2020_12():
    schema = json.loads(COMMITTED.read_text(encoding="utf-8"))
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema)


def _walk_properties(schema):
    defs = schema["$defs"]

    def resolve(node):
        while "$ref" in node:
            node = {**defs[node["$ref"].rsplit("/", 1)[-1]], **{k: v for k, v in node.items() if k != "$ref"}}
        return node

    stack = [("", schema)]
    seen = set()
    while stack:
        prefix, node = stack.pop()
        node = resolve(node)
        for name, prop in node.get("properties", {}).items():
            path = f"{prefix}{name}"
            yield path, prop, name in node.get("required", [])
            target = resolve(prop)
            for sub in [target, *target.get("oneOf", []), *target.get("anyOf", [])]:
                sub = resolve(sub)
                key = (path, json.dumps(sub, sort_keys=True))
                if "properties" in sub and key not in seen:
                    seen.add(key)
                    stack.append((path + ".", sub))


def test_every_setting_has_title_description_default_and_bounds():
    schema = recipe_json_schema()
    defs = schema["$defs"]
    problems = []
    for path, prop, required in _walk_properties(schema):
        target = defs[prop["$ref"].rsplit("/", 1)[-1]] if "$ref" in prop else prop
        if "title" not in prop and "title" not in target:
            problems.append(f"{path}: no title")
        if "description" not in prop and "description" not in target:
            problems.append(f"{path}: no description")
        if required:
            continue
        optional = "type" in prop and "default" not in prop  # unset unless given: an empty input in a form
        if "default" not in prop and not optional:
            problems.append(f"{path}: no default")
        kinds = [prop.get("type")] + [a.get("type") for a in prop.get("anyOf", [])]
        if (
            ("integer" in kinds or "number" in kinds)
            and "const" not in prop
            and not any(k in json.dumps(prop) for k in ("maximum", "exclusiveMaximum"))
        ):
            problems.append(f"{path}: number without an upper bound")
    assert problems == []


def test_optional_settings_are_plain_inputs_not_null_choices():
    text = json.dumps(recipe_json_schema())
    assert '{"type": "null"}' not in text
    training = recipe_json_schema()["$defs"]["TrainingSection"]["properties"]
    assert training["learning_rate"] == {
        "description": training["learning_rate"]["description"],
        "exclusiveMinimum": 0.0,
        "maximum": 0.01,
        "title": "Learning rate",
        "type": "number",
    }
    assert "max_steps" not in recipe_json_schema()["properties"]["training"]["default"]


def test_model_is_a_choice_between_an_approved_and_an_own_model():
    model = recipe_json_schema()["$defs"]["ModelSection"]
    assert [(o["title"], o["required"]) for o in model["oneOf"]] == [
        ("Approved model", ["id"]),
        ("Your own model", ["custom"]),
    ]


def test_method_union_is_renderable_as_a_choice():
    schema = recipe_json_schema()
    method = schema["properties"]["method"]
    assert method["discriminator"] == {"propertyName": "type"}
    assert method["default"]["type"] == "lora"
    titles = {}
    for ref in method["oneOf"]:
        variant = schema["$defs"][ref["$ref"].rsplit("/", 1)[-1]]
        titles[variant["properties"]["type"]["const"]] = variant["title"]
        assert variant["additionalProperties"] is False
        assert variant["required"] == ["type"]
    assert titles == {"full": "Full fine-tuning", "lora": "LoRA", "qlora": "QLoRA"}


def test_enums_are_listed():
    props = recipe_json_schema()["$defs"]["DataSection"]["properties"]
    assert props["format"]["enum"] == ["auto", "messages", "alpaca", "sharegpt", "text", "preference"]
    assert props["truncation"]["enum"] == ["drop", "truncate", "fail"]


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_example_recipes_satisfy_the_schema(path):
    schema = json.loads(COMMITTED.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator(schema).validate(yaml.safe_load(path.read_text(encoding="utf-8")))


@pytest.mark.parametrize(
    "name", ["unknown_key", "wrong_type", "out_of_range", "missing_required", "wrong_method_params", "too_many_gpus"]
)
def test_schema_refuses_what_the_engine_refuses(name):
    schema = json.loads(COMMITTED.read_text(encoding="utf-8"))
    data = yaml.safe_load((ROOT / "tests" / "fixtures" / "bad_recipes" / f"{name}.yaml").read_text())
    assert list(jsonschema.Draft202012Validator(schema).iter_errors(data))


def test_job_name_is_a_bounded_label_whose_rule_the_form_shows():
    name = recipe_json_schema()["properties"]["name"]
    assert (name["type"], name["minLength"], name["maxLength"]) == ("string", 1, 120)
    assert "no '/'" in name["description"] and "not starting with '.'" in name["description"]
