"""The recipe schema renders as a usable form in a standard JSON-Schema form library.

The platform UI generates its recipe form from ``recipes/schema.json``. This test renders the schema for real with
react-jsonschema-form (rjsf, React 18, validated by ajv in 2020-12 mode) in jsdom, through
``tests/form/render_form.mjs``, and checks what a user would see and what the form's validation says.

Needs Node.js (>= 20.19) and the pinned packages: ``npm ci --prefix tests/form``. Without them the test fails,
unless ``FINETUNE_SKIP_FORM_TEST=1`` is set, which skips it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
FORM_DIR = ROOT / "tests" / "form"
SCHEMA_PATH = ROOT / "recipes" / "schema.json"
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"

SCHEMA: dict[str, Any] = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
DEFS: dict[str, Any] = SCHEMA["$defs"]


# ------------------------------------------------------------------------------------------- the rendered report


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The JSON report of render_form.mjs, for the committed schema and the quick-start recipe."""
    if os.environ.get("FINETUNE_SKIP_FORM_TEST") == "1":
        pytest.skip("FINETUNE_SKIP_FORM_TEST=1")
    node = shutil.which("node")
    if node is None or not (FORM_DIR / "node_modules").is_dir():
        pytest.fail(
            "the form rendering test needs Node.js and its packages: run `npm ci --prefix tests/form` "
            "(or set FINETUNE_SKIP_FORM_TEST=1 to skip it)",
            pytrace=False,
        )
    recipe = tmp_path_factory.mktemp("form") / "quickstart.json"
    recipe.write_text(json.dumps(yaml.safe_load(QUICKSTART.read_text(encoding="utf-8"))), encoding="utf-8")
    done = subprocess.run(
        [node, str(FORM_DIR / "render_form.mjs"), str(SCHEMA_PATH), str(recipe)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if done.returncode != 0:
        pytest.fail(f"render_form.mjs failed ({done.returncode}):\n{done.stderr[-4000:]}", pytrace=False)
    return json.loads(done.stdout)


# ------------------------------------------------------------------------------ the settings, as rjsf lays them out


class Setting(NamedTuple):
    id: str  # rjsf's id for it: root_training_learning_rate
    prop: dict[str, Any]  # its schema, $ref resolved (title, description, default...)
    value: dict[str, Any]  # the schema of a value it holds: for `anyOf [X, null]`, X


def resolve(node: dict[str, Any]) -> dict[str, Any]:
    """The node with its $ref replaced by the definition; the node's own keys (title, default) win."""
    while "$ref" in node:
        target = DEFS[node["$ref"].rsplit("/", 1)[-1]]
        node = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
    return node


def types(node: dict[str, Any]) -> set[str]:
    kind = node.get("type", [])
    return {kind} if isinstance(kind, str) else set(kind)


def value_schema(prop: dict[str, Any]) -> dict[str, Any]:
    """What an optional setting holds when set: X for `anyOf [X, null]`; the property itself otherwise."""
    options = [resolve(option) for option in prop.get("anyOf", [])]
    non_null = [option for option in options if types(option) != {"null"}]
    if options and len(non_null) == 1:
        return {**{k: v for k, v in prop.items() if k != "anyOf"}, **non_null[0]}
    return prop


def chosen_variant(prop: dict[str, Any], title: str | None) -> dict[str, Any]:
    """The oneOf variant titled `title`; else the one the default selects through the discriminator, as rjsf does;
    else the first."""
    variants = [resolve(option) for option in prop["oneOf"]]
    if title is not None:
        return next(v for v in variants if v["title"] == title)
    key = prop.get("discriminator", {}).get("propertyName")
    if key and key in prop.get("default", {}):
        return next(v for v in variants if v["properties"][key].get("const") == prop["default"][key])
    return variants[0]


def settings(method: str | None = None) -> Iterator[Setting]:
    """Every section and setting of the form, depth first; `method` picks the method variant by title (default:
    the schema's default, LoRA)."""

    def walk(node: dict[str, Any], prefix: str) -> Iterator[Setting]:
        for name, raw in node.get("properties", {}).items():
            prop = resolve(raw)
            setting = Setting(f"{prefix}_{name}", prop, value_schema(prop))
            yield setting
            if "oneOf" in prop:
                yield from walk(chosen_variant(prop, method if setting.id == "root_method" else None), setting.id)
            elif "properties" in prop:  # a section; an optional object (`anyOf [X, null]`) shows only when chosen
                yield from walk(prop, setting.id)

    yield from walk(SCHEMA, "root")


def is_section(setting: Setting) -> bool:
    return "object" in types(setting.value) or "oneOf" in setting.prop


def shown(value: Any) -> Any:
    """A schema value as an HTML control shows it (JavaScript's String(number): 3.0 -> "3")."""
    if isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def no_problems(problems: list[str], what: str) -> None:
    """Fail listing every problem (pytest would cut a long list short)."""
    assert not problems, f"{what}:\n  " + "\n  ".join(problems)


# ------------------------------------------------------------------------------------------------------- the form


def test_every_section_and_setting_shows_its_title_and_description(report):
    views = [(report["fields"], None), (report["method_qlora"], "QLoRA"), (report["method_full"], "Full fine-tuning")]
    problems = []
    for fields, method in views:
        for s in settings(method):
            if method is not None and not s.id.startswith("root_method"):
                continue
            field = fields.get(s.id)
            if field is None:
                problems.append(f"{s.id}: not rendered")
                continue
            if field["label"] != s.prop["title"]:
                problems.append(f"{s.id}: label {field['label']!r}, schema title {s.prop['title']!r}")
            if "description" in s.prop and field["description"] != s.prop["description"]:
                problems.append(f"{s.id}: description {field['description']!r}")
    no_problems(problems, "fields without their schema title / description")
    for section in ["model", "data", "method", "training", "resources", "output"]:
        assert report["fields"][f"root_{section}"]["kind"] == "section"


def test_every_setting_has_a_control_to_fill_in(report):
    # An optional setting (`anyOf [X, null]`) should still show its input, empty when unset: rjsf instead shows
    # only a "<Title> option 1 / option 2" choice, and the input appears after the user picks "option 1".
    no_control = [
        f"{s.id} ({field['kind']}, selector {field.get('selector', {}).get('options')})"
        for s in settings()
        if not is_section(s) and (field := report["fields"].get(s.id)) and field["kind"] not in {"input", "select"}
    ]
    no_problems(no_control, "settings shown without an input")


def test_choices_between_schema_options_are_named(report):
    # rjsf labels anyOf/oneOf options with their schema titles, else "<Title> option N".
    unnamed = {
        fid: field["selector"]["options"]
        for view in ("fields", "method_qlora")
        for fid, field in report[view].items()
        if "selector" in field
        and any(re.search(r"option \d+$", option) or option in DEFS for option in field["selector"]["options"])
    }
    no_problems([f"{fid}: {options}" for fid, options in unnamed.items()], "choices offered with meaningless names")


def test_constants_cannot_be_edited(report):
    editable = [
        s.id
        for s in settings()
        if "const" in s.value and (field := report["fields"].get(s.id)) and field.get("readonly") is False
    ]
    no_problems(editable, "fixed values shown as editable inputs")


def test_enums_are_selects_with_exactly_the_schema_options(report):
    checked = []
    for view, method in (("fields", None), ("method_qlora", "QLoRA")):
        for s in settings(method):
            if "enum" not in s.value or s.id not in report[view]:
                continue
            field = report[view][s.id]
            assert field["kind"] == "select", s.id
            assert field["options"] == [str(v) for v in s.value["enum"]], s.id
            assert field["selected"] == str(s.value["default"]), s.id
            checked.append(s.id)
    expected = [
        "root_data_format",
        "root_data_truncation",
        "root_training_scheduler",
        "root_resources_zero_stage",
        "root_resources_offload",
        "root_output_archive",
        "root_method_quant_type",
    ]
    assert set(expected) <= set(checked)


def test_mixed_type_enum_keeps_its_numbers(report):
    # ZeRO stage is ["auto", 0, 2, 3]: picking "2" must put the number 2 into the recipe, not the string "2".
    choice = next(c for c in report["choices"] if c["select"] == "root_resources_zero_stage")
    assert choice.get("error") is None
    assert choice["form_data"] == 2 and isinstance(choice["form_data"], int)


def test_method_is_a_choice_of_the_three_titled_variants(report):
    method = SCHEMA["properties"]["method"]
    titles = [resolve(option)["title"] for option in method["oneOf"]]
    assert titles == ["Full fine-tuning", "LoRA", "QLoRA"]
    selector = report["fields"]["root_method"]["selector"]
    assert selector["id"] == "root_method__oneof_select"
    assert selector["options"] == titles
    assert selector["selected"] == "LoRA"
    assert report["fields"]["root_method_rank"]["value"] == "16"
    assert report["fields"]["root_method_alpha"]["value"] == "32"

    # Picking "Full fine-tuning" removes the adapter settings, in the page and in the data.
    full = report["method_full"]
    assert full["root_method"]["selector"]["selected"] == "Full fine-tuning"
    assert sorted(full) == ["root_method", "root_method_type"]
    assert next(c for c in report["choices"] if c["option"] == "Full fine-tuning")["form_data"] == {"type": "full"}

    # Picking "QLoRA" brings them back, with the 4-bit settings.
    qlora = report["method_qlora"]
    assert qlora["root_method"]["selector"]["selected"] == "QLoRA"
    assert qlora["root_method_rank"]["value"] == "16"
    assert qlora["root_method_quant_type"]["options"] == ["nf4", "fp4"]
    assert qlora["root_method_double_quant"]["value"] is True


def test_inputs_show_the_schema_defaults(report):
    wrong = []
    for s in settings():
        field = report["fields"].get(s.id)
        if is_section(s) or field is None or s.prop.get("default") is None or field["kind"] != "input":
            continue
        if field["value"] != shown(s.prop["default"]):
            wrong.append(f"{s.id}: shows {field['value']!r}, default {s.prop['default']!r}")
    no_problems(wrong, "inputs not showing the schema default")
    spot = {f: report["fields"][f]["value"] for f in ["root_training_epochs", "root_resources_gpus"]}
    assert spot == {"root_training_epochs": "3", "root_resources_gpus": "1"}


def test_number_inputs_carry_the_schema_bounds(report):
    wrong = []
    numeric = 0
    for view in ("fields", "recipe_fields", "method_qlora"):
        for s in settings("QLoRA" if view == "method_qlora" else None):
            field = report[view].get(s.id)
            if field is None or field["kind"] != "input" or not types(s.value) & {"number", "integer"}:
                continue
            numeric += 1
            got = {k: field.get(k) for k in ("input_type", "min", "max")}
            want = {
                "input_type": "number",
                "min": shown(s.value["minimum"]) if "minimum" in s.value else None,
                "max": shown(s.value["maximum"]) if "maximum" in s.value else None,
            }
            if "const" in s.value:  # the version: a fixed number, no bounds to show
                want.update(min=None, max=None)
            if got != want:
                wrong.append(f"{view}: {s.id}: {got}, schema {want}")
    no_problems(wrong, "number inputs without the schema's type / bounds")
    assert numeric > 20
    gpus = report["fields"]["root_resources_gpus"]
    assert (gpus["min"], gpus["max"], gpus["step"]) == ("1", "8", "1")


def test_form_shows_the_values_of_a_recipe(report):
    recipe = yaml.safe_load(QUICKSTART.read_text(encoding="utf-8"))

    def flat(node: dict[str, Any], prefix: str = "root") -> Iterator[tuple[str, Any]]:
        for key, value in node.items():
            if isinstance(value, dict):
                yield from flat(value, f"{prefix}_{key}")
            else:
                yield f"{prefix}_{key}", value

    fields = report["recipe_fields"]
    wrong = []
    for fid, value in flat(recipe):
        field = fields.get(fid, {})
        got = field.get("selected") if field.get("kind") == "select" else field.get("value")
        if got != shown(value):
            wrong.append(f"{fid}: shows {got!r}, recipe {value!r}")
    no_problems(wrong, "recipe values not shown")


def test_rendering_logs_no_react_or_rjsf_warnings(report):
    assert report["console"] == []


# ------------------------------------------------------------------------------------------------- validation


def test_empty_form_asks_for_the_model_and_the_data(report):
    result = report["validation"]["empty"]
    assert result["submitted"] is False
    required = {e["property"] for e in result["errors"] if e["name"] == "required"}
    assert ".data.path" in required
    assert report["fields"]["root_data_path"]["required"] is True  # the label carries rjsf's "*"
    assert result["shown_at_fields"]["root_data_path"] == ["must have required property 'Dataset'"]
    # rjsf fills the required "model" section from its defaults ({id: null, custom: null, tiny: false}), which the
    # schema accepts: the form never asks for a model; only the engine refuses the recipe afterwards.
    assert any(p == ".model" or p.startswith(".model.") for p in required), result["errors"]


def test_quickstart_recipe_is_valid_in_the_form(report):
    result = report["validation"]["valid"]
    assert result["errors"] == []
    assert result["submitted"] is True


def test_out_of_range_values_are_reported_at_their_fields(report):
    result = report["validation"]["invalid"]
    assert result["submitted"] is False
    errors = {(e["property"], e["name"]) for e in result["errors"]}
    assert {(".resources.gpus", "maximum"), (".method.rank", "minimum")} <= errors
    assert result["shown_at_fields"]["root_resources_gpus"] == ["must be <= 8"]
    assert result["shown_at_fields"]["root_method_rank"] == ["must be >= 1"]


def test_only_the_chosen_methods_errors_are_reported(report):
    # Without ajv's discriminator support every oneOf branch reports: rank 0 in a LoRA method also gives
    # "'Full fine-tuning' must NOT have additional properties" (x5) and "'Method' must be equal to constant".
    # ajv needs the discriminator property required in every variant and no "mapping" to use it.
    discriminator = report["discriminator"]
    assert discriminator["accepted"], discriminator.get("error")
    errors = {(e["property"], e["name"]) for e in discriminator["invalid_errors"]}
    assert errors == {(".resources.gpus", "maximum"), (".method.rank", "minimum")}
