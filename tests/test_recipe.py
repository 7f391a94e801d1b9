"""The Recipe model: defaults, bounds, the method union and cross-field rules."""

import pytest
from pydantic import ValidationError

from finetune.paths import bucket_path_problem
from finetune.recipe import (
    JOB_NAME_HINT,
    MAX_GPUS_PER_JOB,
    LoraMethod,
    QloraMethod,
    Recipe,
    cross_field_issues,
    default_learning_rate,
    job_name_problem,
)

MINIMAL = {"model": {"id": "llama-3.2-1b-instruct"}, "data": {"path": "data/train.jsonl"}}


def recipe(**sections):
    return Recipe.model_validate({**MINIMAL, **sections})


def test_minimal_recipe_gets_sensible_defaults():
    r = recipe()
    assert isinstance(r.method, LoraMethod) and r.method.type == "lora"
    assert r.method.rank == 16 and r.method.target_modules == "all-linear"
    assert r.data.format == "auto" and r.data.packing is True and r.data.max_seq_len == 2048
    assert r.data.bad_rows.policy == "skip" and r.data.bad_rows.max_fraction == 0.01
    assert r.resources.gpus == 1 and r.resources.zero_stage == "auto"
    assert r.output.archive == "merged"
    assert default_learning_rate(r) == 2e-4
    assert default_learning_rate(recipe(method={"type": "full"})) == 1e-5
    assert cross_field_issues(r) == []


def test_method_union_picks_the_variant_by_type():
    r = recipe(method={"type": "qlora", "rank": 8})
    assert isinstance(r.method, QloraMethod) and r.method.quant_type == "nf4"
    with pytest.raises(ValidationError) as exc:
        recipe(method={"type": "full", "rank": 8})
    assert [e["loc"] for e in exc.value.errors()] == [("method", "full", "rank")]


@pytest.mark.parametrize(
    ("path", "problem"),
    [
        ("../x.jsonl", "must not contain '..' (got '../x.jsonl')"),
        ("data/../../x", "must not contain '..' (got 'data/../../x')"),
        ("/etc/passwd", "must be a path inside your bucket, not an absolute path (got '/etc/passwd')"),
        ("C:/data.csv", "must be a path inside your bucket, not an absolute path (got 'C:/data.csv')"),
        ("data\\x.csv", "must use '/' between folders, not '\\'"),
        ("s3://other/x", "must be a path inside your bucket, without a scheme (got 's3://other/x')"),
        ("  ", "must not be empty"),
        ("a\x00b", "must not contain control characters"),
        ("./", "must name a file or folder inside your bucket"),
    ],
)
def test_bucket_paths_that_escape_are_refused(path, problem):
    assert bucket_path_problem(path) == problem


def test_bucket_paths_are_normalised():
    assert recipe(data={"path": "./data//train.jsonl"}).data.path == "data/train.jsonl"
    assert bucket_path_problem("data/訓練資料.jsonl") is None


def test_gpu_bound_is_the_largest_grant():
    recipe(resources={"gpus": MAX_GPUS_PER_JOB})
    with pytest.raises(ValidationError):
        recipe(resources={"gpus": MAX_GPUS_PER_JOB + 1})


def test_zero_stage_accepts_auto_and_the_three_stages_only():
    for stage in ("auto", 0, 2, 3):
        assert recipe(resources={"zero_stage": stage}).resources.zero_stage == stage
    with pytest.raises(ValidationError):
        recipe(resources={"zero_stage": 1})


def test_cross_field_rules_point_at_the_field_to_change():
    r = recipe(
        data={"path": "d.jsonl", "eval": {"fraction": 0.0}},
        method={"type": "full"},
        training={
            "max_steps": 10,
            "warmup_steps": 10,
            "gradient_accumulation_steps": 2,
            "tokens_per_step": 4096,
            "early_stopping": {"patience": 2},
        },
        output={"archive": "adapter"},
    )
    assert [(i.path, i.message) for i in cross_field_issues(r)] == [
        ("training.warmup_steps", "warm-up (10 steps) must be shorter than training (10 steps)"),
        ("training.tokens_per_step", "set either gradient_accumulation_steps or tokens_per_step, not both"),
        ("training.early_stopping.patience", "early stopping needs evaluation data"),
        ("output.archive", "'adapter' needs an adapter: use method lora or qlora, or archive 'merged'"),
    ]


def test_model_needs_exactly_one_source():
    r = Recipe.model_validate({"model": {}, "data": {"path": "d.jsonl"}})
    assert [i.path for i in cross_field_issues(r)] == ["model"]
    both = {"id": "x", "custom": {"path": "m", "developer": "Acme", "country": "TW"}}
    r = Recipe.model_validate({"model": both, "data": {"path": "d.jsonl"}})
    assert [i.message for i in cross_field_issues(r)] == [
        "give either an approved model 'id' or a 'custom' model, not both"
    ]


def test_custom_model_country_must_be_an_iso_code():
    with pytest.raises(ValidationError):
        Recipe.model_validate(
            {"model": {"custom": {"path": "m", "developer": "Acme", "country": "Taiwan"}}, "data": {"path": "d"}}
        )


def test_target_modules_list_or_all_linear():
    assert recipe(method={"type": "lora", "target_modules": ["q_proj", "v_proj"]}).method.target_modules == [
        "q_proj",
        "v_proj",
    ]
    with pytest.raises(ValidationError):
        recipe(method={"type": "lora", "target_modules": []})
    with pytest.raises(ValidationError):
        recipe(method={"type": "lora", "target_modules": ["os.system('x')"]})


def test_a_recipe_never_names_code_to_import():
    # No field of the schema accepts an import path or a callable: walk every field name.
    def names(model, prefix=""):
        for name, info in model.model_fields.items():
            yield prefix + name
            ann = info.annotation
            if isinstance(ann, type) and hasattr(ann, "model_fields"):
                yield from names(ann, prefix + name + ".")

    forbidden = ("_component_", "_target_", "class_path", "import", "callable", "module_path")
    assert not [n for n in names(Recipe) if any(f in n for f in forbidden)]


@pytest.mark.parametrize(
    "name", ["quickstart", "support-bot-v2", "legal_qa.v1.2", "臺灣-模型", "नमस्ते", "_x", "x" * 120]
)
def test_job_names_are_identifiers_in_any_script(name):
    assert recipe(name=name).name == name
    assert job_name_problem(name) is None


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("../../x", "a job name is a label, not a path: it cannot contain '/' or '\\'"),
        ("/srv/finetune/jobs/other", "a job name is a label, not a path: it cannot contain '/' or '\\'"),
        ("C:\\jobs", "a job name is a label, not a path: it cannot contain '/' or '\\'"),
        (".hidden", "a job name cannot start with '.'"),
        ("..", "a job name cannot start with '.'"),
        ("-rf", "a job name cannot start with '-'"),
        ("my job", "a job name cannot contain spaces"),
        ("a\nb", "a job name cannot contain spaces"),
        ("a\x1b[31mb", "a job name cannot contain control or invisible characters (found U+001B)"),
        ("a\u202eb", "a job name cannot contain control or invisible characters (found U+202E)"),
        ("a:b", "a job name cannot contain ':'"),
        ("$(id)", "a job name cannot contain '$'"),
    ],
)
def test_job_names_that_could_lead_elsewhere_are_refused(name, problem):
    assert job_name_problem(name) == problem
    with pytest.raises(ValidationError) as exc:
        recipe(name=name)
    [error] = exc.value.errors()
    assert error["loc"] == ("name",) and error["ctx"]["error"].hint == JOB_NAME_HINT


def test_job_name_length_is_bounded():
    for name in ("", "x" * 121):
        with pytest.raises(ValidationError):
            recipe(name=name)
    assert recipe().name is None
