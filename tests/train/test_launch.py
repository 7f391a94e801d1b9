"""Failures users hit are reported before any work starts; one preparation serves every entry point."""

import json
import shutil
from pathlib import Path

import pytest
import yaml

from finetune.errors import FinetuneError, ModelStoreError, RecipeError
from finetune.jobstore import JobStore, JobStoreRef
from finetune.prepare import prepare_job
from finetune.recipe import Recipe
from finetune.registry import Registry
from finetune.settings import Settings
from finetune.storage import Bucket, BucketRef
from finetune.train.data import JobDataError
from finetune.train.launch import JobFolderError, launch, plan_job
from finetune.train.spec import JobSpec
from finetune.validate import load_recipe

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def settings(tmp_path):
    return Settings(data_dir=tmp_path / "data")


@pytest.fixture(scope="module")
def registry():
    return Registry.load(Settings().registry)


def recipe_file(tmp_path: Path, name: str = "recipe.yaml", **changes) -> Path:
    doc = yaml.safe_load((ROOT / "recipes" / "quickstart.yaml").read_text())
    for section, values in changes.items():
        doc[section] = {**doc.get(section, {}), **values} if isinstance(values, dict) else values
    (tmp_path / "data").mkdir(exist_ok=True)
    shutil.copy(ROOT / "recipes" / "data" / "quickstart.jsonl", tmp_path / "data" / "quickstart.jsonl")
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc, allow_unicode=True))
    return path


def plan(path: Path, settings: Settings, registry: Registry, output: Path | None = None):
    store = JobStore.folder(output or settings.data_dir / "jobs" / "job")
    return plan_job(load_recipe(path, registry), Bucket.folder(path.parent), store, settings, registry=registry)


def spec_for(tmp_path: Path, gpus: int) -> JobSpec:
    store = JobStoreRef(bucket=BucketRef(url=tmp_path.as_uri()), prefix="", job_id="j")
    return JobSpec(store=store, recipe={"resources": {"gpus": gpus}}, model_dir="", settings={})


def test_qlora_without_cuda_is_refused_before_any_work(tmp_path, settings, registry):
    path = recipe_file(tmp_path, method={"type": "qlora"}, output={"archive": "adapter"})
    with pytest.raises(RecipeError) as exc:
        plan(path, settings, registry)
    assert [str(i) for i in exc.value.issues] == [
        "method.type: QLoRA needs a CUDA GPU (4-bit kernels); none is available here "
        "(hint: use method lora on this machine, or run on a GPU)"
    ]
    assert not any((settings.data_dir / "jobs" / "job").iterdir())  # nothing was started


def test_a_model_missing_from_the_store_names_the_command_to_import_it(tmp_path, settings, registry):
    path = recipe_file(tmp_path, model={"id": "llama-3.2-1b-instruct", "tiny": False})
    with pytest.raises(ModelStoreError, match=r"run `finetune models import SNAPSHOT_DIR --id llama-3.2-1b-instruct`"):
        plan(path, settings, registry)


def test_the_local_launcher_refuses_several_workers(tmp_path, settings):
    with pytest.raises(RecipeError, match="use --launcher ray for several workers"):
        launch(spec_for(tmp_path, 2), "local", settings)


def test_more_workers_than_devices_is_refused_instead_of_waiting_forever(tmp_path):
    settings = Settings(data_dir=tmp_path, ray_address=None)
    with pytest.raises(RecipeError, match="asks for 64 workers but this machine has"):
        launch(spec_for(tmp_path, 64), "ray", settings)


def test_a_job_folder_keeps_its_recipe_and_its_data(tmp_path, settings, registry):
    path = recipe_file(tmp_path)
    spec, job = plan(path, settings, registry, output=tmp_path / "job")
    assert job.report.rows_used == 52
    assert json.loads((tmp_path / "job" / "recipe.json").read_text()) == spec.recipe
    assert (tmp_path / "job" / "data" / "COMMITTED.json").is_file()
    assert plan(path, settings, registry, output=tmp_path / "job")[0] == spec  # same recipe and data: resume
    changed = recipe_file(tmp_path, "changed.yaml", training={"epochs": 3})
    with pytest.raises(JobFolderError, match="holds a job with a different recipe"):
        plan(changed, settings, registry, output=tmp_path / "job")
    claim = json.loads((tmp_path / "job" / "claim.json").read_text())
    assert set(claim) == {"recipe_sha256", "dataset_sha256", "model"}
    dataset = tmp_path / "data" / "quickstart.jsonl"
    original = dataset.read_bytes()
    with dataset.open("a") as fh:
        fh.write(json.dumps({"messages": [{"role": "user", "content": "新"}, {"role": "assistant", "content": "的"}]}))
    with pytest.raises(JobFolderError, match=r"started on other input: the dataset .* differ"):
        plan(path, settings, registry, output=tmp_path / "job")
    dataset.write_bytes(original)
    weights = next(job.model.folder.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")  # the same model id, other weights
    with pytest.raises(JobFolderError, match="the model's weights differ"):
        plan(path, settings, registry, output=tmp_path / "job")


def test_a_recipe_object_without_any_file_reaches_the_same_prepared_job(tmp_path, settings, registry):
    """The service holds a Recipe from a request and the tenant's bucket: no recipe file anywhere."""
    path = recipe_file(tmp_path)
    from_file = prepare_job(load_recipe(path, registry), Bucket.folder(tmp_path), settings, registry=registry)
    doc = yaml.safe_load(path.read_text())
    config = StorageConfigFor(tmp_path)
    bucket = Bucket(config, "t1", "2026q1")
    bucket.upload(tmp_path / "data" / "quickstart.jsonl", "data/quickstart.jsonl")
    from_object = prepare_job(Recipe.model_validate(doc), bucket, settings, registry=registry)
    assert from_object.report.cache_hit and not from_file.report.cache_hit  # the same data: the same cache entry
    assert from_object.report.as_dict() == {**from_file.report.as_dict(), "cache_hit": True}
    assert from_object.plan == from_file.plan
    assert from_object.model.folder == from_file.model.folder and from_object.model.eot == "<|im_end|>"
    assert [r.input_ids for r in from_object.train_rows] == [r.input_ids for r in from_file.train_rows]


def StorageConfigFor(root: Path):  # noqa: N802
    from finetune.storage import StorageConfig

    return StorageConfig(url=(root / "buckets").as_uri())


def test_a_failing_job_records_a_typed_failure_saying_whose_move_it_is(tmp_path, settings, registry):
    from finetune.events import read_events

    path = recipe_file(tmp_path)
    spec, _ = plan(path, settings, registry, output=tmp_path / "job")
    arrow = next((tmp_path / "job" / "data" / "train").glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[:-4] + b"XXXX")  # altered in the bucket after it was published
    with pytest.raises(JobDataError, match="does not match its sha256 digest"):
        launch(spec, "local", settings)
    [failure] = read_events(Bucket.folder(tmp_path / "job"), "")
    assert failure.kind == "failure" and failure.seq == 1
    assert failure.error.type == "JobDataError" and failure.error.fault == "tenant"
    assert "prepared data" in failure.error.message


def test_the_limits_on_tenant_input_are_settings(tmp_path, registry, monkeypatch):
    """Operators bound what reading a tenant's recipe and dataset may cost, without a code change."""
    from finetune.data.pipeline import DataError

    monkeypatch.setenv("FINETUNE_DATA_LIMITS__ROW_BYTES", "200")
    monkeypatch.setenv("FINETUNE_RECIPE_LIMITS__MAX_DEPTH", "2")
    settings = Settings(data_dir=tmp_path / "data")
    assert settings.data_limits.row_bytes == 200 and settings.recipe_limits.max_depth == 2
    assert Settings(**settings.for_workers()).data_limits.row_bytes == 200  # the workers get them too
    path = recipe_file(tmp_path)
    with pytest.raises(RecipeError, match="nested"):
        load_recipe(path, registry, settings.recipe_limits)
    recipe = load_recipe(path, registry)
    with pytest.raises(DataError) as refused:
        prepare_job(recipe, Bucket.folder(tmp_path), settings, registry=registry)
    assert any("more than the 200 bytes allowed per row" in i.message for i in refused.value.issues)


def test_a_failed_job_on_ray_keeps_the_fault_its_workers_recorded(tmp_path):
    """Ray reports every worker failure as its own; the job's failure event keeps the tenant's fault."""
    from finetune.events import EndEvent, ErrorInfo, EventLog, FailureEvent, JobSummary
    from finetune.train.ray_launch import recorded_failure, recorded_summary

    store = JobStore.folder(tmp_path / "job")
    log = EventLog(store.bucket, store.prefix)
    summary = JobSummary(steps=3, preempted=False, stopped_early=False, final="final", zero_stage=0)
    log.emit(EndEvent(step=3, summary=summary))  # an earlier attempt's end: not this run's
    error = ErrorInfo(type="JobDataError", message="the prepared data ... does not match", fault="tenant")
    log.emit(FailureEvent(step=0, error=error))
    log.close()
    failed = recorded_failure(store, after=1)
    assert failed is not None and failed.fault == "tenant" and "JobDataError" in str(failed)
    assert recorded_failure(store, after=2) is None
    assert recorded_summary(store, after=0) == summary
    with pytest.raises(FinetuneError, match="without recording its end"):
        recorded_summary(store, after=1)


def test_whose_move_a_failure_is():
    from finetune.errors import fault_of

    lost = RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:19330")
    assert fault_of(lost) == "transient" and fault_of(ConnectionResetError()) == "transient"
    assert fault_of(JobDataError([], "altered")) == "tenant" and fault_of(RecipeError([])) == "tenant"
    assert fault_of(RuntimeError("shape mismatch")) == "platform"
