"""Failures users hit are reported before any work starts, with what to do about them."""

import shutil
from pathlib import Path

import pytest
import yaml

from finetune.errors import ModelStoreError, RecipeError
from finetune.registry import Registry
from finetune.settings import Settings
from finetune.train.launch import JobFolderError, launch, plan_job
from finetune.train.run import JobSpec

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def settings(tmp_path):
    return Settings(data_dir=tmp_path / "data")


@pytest.fixture(scope="module")
def registry():
    return Registry.load(Settings().registry)


def recipe_file(tmp_path: Path, **changes) -> Path:
    doc = yaml.safe_load((ROOT / "recipes" / "quickstart.yaml").read_text())
    for section, values in changes.items():
        doc[section] = {**doc.get(section, {}), **values} if isinstance(values, dict) else values
    (tmp_path / "data").mkdir(exist_ok=True)
    shutil.copy(ROOT / "recipes" / "data" / "quickstart.jsonl", tmp_path / "data" / "quickstart.jsonl")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(doc, allow_unicode=True))
    return path


def test_qlora_without_cuda_is_refused_before_any_work(tmp_path, settings, registry):
    path = recipe_file(tmp_path, method={"type": "qlora"}, output={"archive": "adapter"})
    with pytest.raises(RecipeError) as exc:
        plan_job(path, settings, registry=registry)
    assert [str(i) for i in exc.value.issues] == [
        "method.type: QLoRA needs a CUDA GPU (4-bit kernels); none is available here "
        "(hint: use method lora on this machine, or run on a GPU)"
    ]
    assert not (settings.data_dir / "jobs").exists()  # nothing was started


def test_a_model_missing_from_the_store_names_the_command_to_import_it(tmp_path, settings, registry):
    path = recipe_file(tmp_path, model={"id": "llama-3.2-1b-instruct", "tiny": False})
    with pytest.raises(ModelStoreError, match=r"run `finetune models import SNAPSHOT_DIR --id llama-3.2-1b-instruct`"):
        plan_job(path, settings, registry=registry)


def test_the_local_launcher_refuses_several_workers(tmp_path):
    spec = JobSpec(recipe={"resources": {"gpus": 2}}, job_dir=str(tmp_path), model_dir="", bucket_dir="", cache_dir="")
    with pytest.raises(RecipeError, match="use --launcher ray for several workers"):
        launch(spec, "local")


def test_more_workers_than_devices_is_refused_instead_of_waiting_forever(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    spec = JobSpec(recipe={"resources": {"gpus": 64}}, job_dir=str(tmp_path), model_dir="", bucket_dir="", cache_dir="")
    with pytest.raises(RecipeError, match="asks for 64 workers but this machine has"):
        launch(spec, "ray")


def test_a_job_folder_keeps_its_recipe(tmp_path, settings, registry):
    path = recipe_file(tmp_path)
    spec, report = plan_job(path, settings, registry=registry, output=tmp_path / "job")
    assert report["rows_used"] == 52 and Path(spec.job_dir, "recipe.json").is_file()
    assert plan_job(path, settings, registry=registry, output=tmp_path / "job")[0] == spec  # same recipe: resume
    changed = recipe_file(tmp_path, training={"epochs": 3})
    with pytest.raises(JobFolderError, match="holds a job with a different recipe"):
        plan_job(changed, settings, registry=registry, output=tmp_path / "job")
