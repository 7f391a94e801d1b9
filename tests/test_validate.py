"""Recipe validation end to end: every example is valid, every bad recipe gives its exact error."""

import io
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from finetune.cli import main
from finetune.errors import RecipeError
from finetune.limits import Limits
from finetune.recipe import Recipe
from finetune.settings import get_settings
from finetune.validate import environment_issues, validate_text

ROOT = Path(__file__).resolve().parents[1]
BAD = ROOT / "tests" / "fixtures" / "bad_recipes"
EXAMPLES = sorted((ROOT / "recipes").glob("*.yaml"))


@pytest.fixture(scope="module")
def registry():
    from finetune.registry import Registry

    return Registry.load(get_settings().registry)


def run_cli(*args: str) -> tuple[int, str]:
    out = io.StringIO()
    with redirect_stdout(out):
        code = main(list(args))
    return code, out.getvalue()


def test_the_required_examples_exist():
    names = {p.stem for p in EXAMPLES}
    assert {"quickstart", "lora_chat_sft", "full_sft_zero3", "qlora", "continued_pretraining"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_recipe_is_valid(path):
    code, out = run_cli("validate", str(path))
    assert (code, out) == (0, f"{path}: OK\n")


def test_bad_recipes_cover_the_required_cases():
    names = {p.stem for p in BAD.glob("*.yaml")}
    required = {
        "unknown_key", "wrong_type", "out_of_range", "missing_required", "denied_model", "unknown_model",
        "dataset_dotdot", "dataset_absolute", "bad_yaml", "empty", "wrong_method_params", "too_many_gpus",
        "alias_bomb", "huge_integer", "too_deep", "custom_tag", "bad_name", "too_many_errors",
    }  # fmt: skip
    assert required <= names
    assert {p.stem for p in BAD.glob("*.expected")} == names


@pytest.mark.parametrize("path", sorted(BAD.glob("*.yaml")), ids=lambda p: p.stem)
def test_bad_recipe_gives_its_exact_errors(path, monkeypatch):
    monkeypatch.chdir(BAD)
    code, out = run_cli("validate", path.name)
    assert code == 2
    assert out == path.with_suffix(".expected").read_text(encoding="utf-8")


def test_console_script_reports_every_file_and_exits_2():
    files = [str(EXAMPLES[0]), str(BAD / "too_many_gpus.yaml")]
    proc = subprocess.run([sys.executable, "-m", "finetune.cli", "validate", *files], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stdout.splitlines()[0] == f"{EXAMPLES[0]}: OK"
    assert "resources.gpus: must be at most 8 (got 16)" in proc.stdout


def test_json_output_lists_located_issues():
    code, out = run_cli("validate", "--json", str(BAD / "out_of_range.yaml"))
    import json

    [result] = json.loads(out)
    assert code == 2 and result["valid"] is False
    assert result["issues"] == [
        {"file": str(BAD / "out_of_range.yaml"), "line": 7, "path": "method.rank",
         "message": "must be at most 512 (got 1024)", "hint": None}
    ]  # fmt: skip


def test_max_seq_len_cannot_exceed_the_model(registry):
    text = "model: {id: smollm2-135m-instruct}\ndata: {path: d.jsonl, max_seq_len: 100000}\n"
    _, issues = validate_text(text, registry, "r.yaml")
    assert [str(i) for i in issues] == [
        "r.yaml:2: data.max_seq_len: 'smollm2-135m-instruct' handles at most 8192 tokens (got 100000)"
    ]


def test_registry_repo_name_gets_the_registry_id_as_hint(registry):
    _, issues = validate_text("model: {id: meta-llama/Llama-3.2-1B-Instruct}\ndata: {path: d}\n", registry)
    assert issues[0].hint == "use the registry id 'llama-3.2-1b-instruct'"


def test_qlora_needs_cuda_at_run_time():
    r = Recipe.model_validate({"model": {"id": "x"}, "data": {"path": "d"}, "method": {"type": "qlora"}})
    assert [str(i) for i in environment_issues(r, cuda_available=False, devices=0)] == [
        "method.type: QLoRA needs a CUDA GPU (4-bit kernels); none is available here "
        "(hint: use method lora on this machine, or run on a GPU)"
    ]
    assert environment_issues(r, cuda_available=True, devices=1) == []
    r2 = Recipe.model_validate({"model": {"id": "x"}, "data": {"path": "d"}, "resources": {"gpus": 4}})
    assert [i.path for i in environment_issues(r2, cuda_available=True, devices=2)] == ["resources.gpus"]


def test_json_output_lists_the_first_problems_and_counts_the_rest():
    code, out = run_cli("validate", "--json", str(BAD / "too_many_errors.yaml"))
    import json

    [result] = json.loads(out)
    assert code == 2 and len(result["issues"]) == 51
    assert [i["path"] for i in result["issues"][:2]] == ["setting_00", "setting_01"]
    assert result["issues"][-1] == {
        "file": str(BAD / "too_many_errors.yaml"), "line": None, "path": "",
        "message": "... and 10 more problems", "hint": None, "more": 10,
    }  # fmt: skip


def test_issues_are_capped_and_clipped_by_the_limits(registry):
    key = "k" * 5000
    text = "model: {id: llama-3.2-1b-instruct}\ndata: {path: d.jsonl}\n" + "".join(
        f"? {key}{i}\n: 1\n" for i in range(9)
    )
    _, issues = validate_text(text, registry, "r.yaml", Limits(max_issues=3))
    assert [i.line for i in issues] == [3, 5, 7, None]
    assert str(issues[-1]) == "r.yaml: ... and 6 more problems"
    assert all(len(str(i)) < 1000 for i in issues)
    _, issues = validate_text("a: [\n", registry, "r.yaml", Limits(max_issues=3))
    assert len(issues) == 1


def test_load_recipe_error_lists_the_first_problems_only(registry):
    from finetune.validate import load_recipe

    with pytest.raises(RecipeError) as exc:
        load_recipe(BAD / "too_many_errors.yaml", registry)
    lines = str(exc.value).splitlines()
    assert len(lines) == 52 and lines[-1].endswith("... and 10 more problems")
