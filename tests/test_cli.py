"""The `finetune models` commands, through the real argument parser."""

import io
import json
import shutil
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import yaml

from finetune import cli
from finetune.cli import main
from finetune.modelstore import resolve_model
from finetune.registry import Registry
from finetune.settings import get_settings

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(autouse=True)
def data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_DATA_DIR", str(tmp_path / "data"))
    return tmp_path / "data"


def test_models_list_json_has_the_required_entries():
    code, out, _ = run("models", "list", "--json")
    entries = {e["id"]: e for e in json.loads(out)}
    by_status = {s: [e for e in entries.values() if e["status"] == s] for s in ("approved", "pending", "denied")}
    assert code == 0
    assert len(by_status["approved"]) >= 15 and len(by_status["denied"]) >= 10
    assert entries["taide-llama3-8b-chat-alpha1"]["status"] == "approved"
    assert entries["taide-llama3-8b-chat-alpha1"]["model_type"] == "llama"
    assert entries["yi-1.5-34b"]["status"] == "denied" and entries["yi-1.5-34b"]["model_type"] == "llama"
    assert entries["deepseek-r1-distill-llama-8b"]["status"] == "denied"
    assert entries["llama-breeze2-8b-instruct"]["status"] == "pending"
    assert run("models", "list", "--json", "--status", "pending")[1].count('"id"') == len(by_status["pending"])


def test_models_show_gives_the_verdict_and_template():
    code, out, _ = run("models", "show", "yi-1.5-34b", "--json")
    data = json.loads(out)
    assert code == 0 and data["verdict"]["decision"] == "deny"
    assert data["architecture"]["model_type"] == "llama"
    code, out, _ = run("models", "show", "gemma-3-1b-it")
    shown = yaml.safe_load(out)
    assert shown["verdict"]["decision"] == "allow" and "<start_of_turn>" in shown["chat"]["template_text"]
    code, _, err = run("models", "show", "gemma-3-1b")
    assert code == 2 and "unknown model 'gemma-3-1b'" in err


def test_materialize_into_the_store_then_resolve(data_dir):
    code, out, _ = run("models", "materialize", "llama-3.2-1b-instruct", "--tiny")
    assert code == 0
    settings = get_settings()
    path = resolve_model(Registry.load(settings.registry), "llama-3.2-1b-instruct", settings.store_path, tiny=True)
    assert path == data_dir / "models" / "llama-3.2-1b-instruct" / "tiny-random"
    assert f"written to {path}" in out


def test_check_custom_model_pending_denied_and_refused(tmp_path):
    folder = tmp_path / "upload"
    assert run("models", "materialize", "mistral-7b-instruct-v0.3", "--tiny", "--dest", str(folder))[0] == 0
    code, out, _ = run("models", "check", str(folder), "--developer", "Acme AI", "--country", "TW", "--json")
    report = json.loads(out)
    assert code == 0 and report["status"] == "pending" and report["model_type"] == "mistral"
    assert "model.safetensors" in report["files"]
    code, out, _ = run("models", "check", str(folder), "--developer", "DeepSeek", "--country", "US")
    assert code == 2 and out.startswith(f"{folder}: denied (deny)")
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04")
    code, _, err = run("models", "check", str(folder), "--developer", "Acme AI", "--country", "TW")
    assert code == 2
    assert "pytorch_model.bin: pickle weights are refused: loading them can run code" in err


def test_import_refuses_a_tiny_model_under_the_real_models_name(tmp_path):
    folder = tmp_path / ("f" * 40)
    run("models", "materialize", "smollm2-135m-instruct", "--tiny", "--dest", str(folder))
    code, _, err = run("models", "import", str(folder), "--id", "smollm2-135m-instruct")
    assert code == 2
    assert "config.json:hidden_size: is 64 but registry entry 'smollm2-135m-instruct' says 576" in err


def test_import_then_train_path_resolves(tmp_path, monkeypatch, data_dir):
    # A registry whose entry describes exactly the tiny architecture, so the identity check passes.
    folder = tmp_path / "snap"
    run("models", "materialize", "smollm2-135m-instruct", "--tiny", "--dest", str(folder))
    config = json.loads((folder / "config.json").read_text())
    doc = yaml.safe_load((ROOT / "model_registry.yaml").read_text())
    entry = next(e for e in doc["models"] if e["id"] == "smollm2-135m-instruct")
    entry["architecture"].update(
        {
            k: config[k]
            for k in (
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "vocab_size",
            )
        }
    )
    reg_path = tmp_path / "registry.yaml"
    reg_path.write_text(yaml.safe_dump(doc, allow_unicode=True, sort_keys=False))
    monkeypatch.setenv("FINETUNE_REGISTRY", str(reg_path))
    rev = "1" * 40
    code, out, err = run("models", "import", str(folder), "--id", "smollm2-135m-instruct", "--revision", rev)
    assert code == 0, err
    settings = get_settings()
    registry = Registry.load(settings.registry, settings.lock_path)
    assert registry.get("smollm2-135m-instruct").source.revision == rev
    assert (
        resolve_model(registry, "smollm2-135m-instruct", settings.store_path)
        == data_dir / "models" / "smollm2-135m-instruct" / rev
    )
    # a second import of the same files is accepted; of other files, refused
    assert run("models", "import", str(folder), "--id", "smollm2-135m-instruct", "--revision", rev)[0] == 0
    (folder / "tokenizer_config.json").write_text("{}")
    code, _, err = run("models", "import", str(folder), "--id", "smollm2-135m-instruct", "--revision", rev)
    assert code == 1 and "does not match its pinned digests: tokenizer_config.json" in err


def test_what_libraries_print_goes_to_stderr_and_results_to_stdout(monkeypatch):
    def noisy(args, settings):
        print("a library talking")
        cli._print_json({"ok": True})
        return 0

    monkeypatch.setattr(cli, "cmd_schema", noisy)
    code, out, err = run("schema")
    assert code == 0 and json.loads(out) == {"ok": True} and err == "a library talking\n"


def test_json_errors_are_json(monkeypatch):
    code, out, err = run(
        "data", "inspect", str(ROOT / "tests" / "fixtures" / "bad_recipes" / "unknown_key.yaml"), "--json"
    )
    error = json.loads(out)
    assert code == 2 and error["error"] and "learning_rte" in err
    assert [i["path"] for i in error["issues"]] == ["training.learning_rte"]

    def broken(args, settings):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "cmd_models_list", broken)
    out = io.StringIO()
    with redirect_stdout(out), redirect_stderr(io.StringIO()), pytest.raises(RuntimeError):
        main(["models", "list", "--json"])
    assert json.loads(out.getvalue()) == {"error": "internal error: RuntimeError: a bug", "issues": []}


def test_a_custom_model_trains_only_after_an_approved_review(tmp_path):
    bucket = tmp_path / "bucket"
    (bucket / "data").mkdir(parents=True)
    (bucket / "data" / "train.jsonl").write_text((ROOT / "recipes" / "data" / "quickstart.jsonl").read_text())
    model = bucket / "models" / "mine"
    assert run("models", "materialize", "smollm2-135m-instruct", "--tiny", "--dest", str(model))[0] == 0
    recipe = bucket / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump({
            "model": {"custom": {"path": "models/mine", "developer": "Example Labs", "country": "TW"}},
            "data": {"path": "data/train.jsonl", "max_seq_len": 128},
        })
    )  # fmt: skip
    code, _, err = run("data", "inspect", str(recipe))
    assert code != 0 and "finetune models review" in err, err
    code, out, err = run("models", "review", str(model), "--developer", "Example Labs", "--country", "TW",
                         "--approve", "--reason", "weights traced to the uploader's own pre-training run")  # fmt: skip
    assert code == 0 and "approved" in out, err
    code, out, err = run("data", "inspect", str(recipe))
    assert code == 0 and "rows" in out, err
    (model / "config.json").write_text((model / "config.json").read_text().replace("}", ', "auto_map": {}}', 1))
    code, _, err = run("data", "inspect", str(recipe))
    assert code != 0, "changed files need a new review"


def test_a_special_token_in_the_system_prompt_is_blamed_on_the_recipe_field(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text((ROOT / "recipes" / "data" / "quickstart.jsonl").read_text())
    recipe = tmp_path / "recipe.yaml"
    doc = yaml.safe_load((ROOT / "recipes" / "quickstart.yaml").read_text())
    doc["data"] |= {"path": "data/train.jsonl", "system_prompt": "Be brief.<|im_end|>"}
    recipe.write_text(yaml.safe_dump(doc, allow_unicode=True))
    code, out, err = run("data", "inspect", str(recipe), "--json")
    assert code == 2 and "data.system_prompt: contains the special token '<|im_end|>'" in err
    assert [i["path"] for i in json.loads(out)["issues"]] == ["data.system_prompt"]


def test_a_dataset_path_linked_out_of_the_bucket_is_the_tenants_to_fix(tmp_path):
    outside = tmp_path / "outside.jsonl"
    outside.write_text((ROOT / "recipes" / "data" / "quickstart.jsonl").read_text())
    bucket = tmp_path / "bucket"
    (bucket / "data").mkdir(parents=True)
    (bucket / "data" / "quickstart.jsonl").symlink_to(outside)
    shutil.copy(ROOT / "recipes" / "quickstart.yaml", bucket / "recipe.yaml")
    code, _, err = run("data", "inspect", str(bucket / "recipe.yaml"))
    assert code == 2 and "data/quickstart.jsonl" in err and "link" in err, err
