"""What a hostile tenant hands the command line is refused with exit 2, located, bounded, and writes
nothing outside the engine's own folders.

Each case runs ``python -m finetune.cli`` in a subprocess under a 2 GiB address-space limit and a
time limit, in a fresh working folder. After it, every file under the test's root that is new must
lie in the engine's data folder (caches, reports, the model store) or in the job's own folder.
The parsers themselves have their own corpora (tests/test_hostile_recipes.py,
tests/data/test_hostile_data.py, tests/test_hostile_models.py, tests/archive); this file checks
the whole command on the cases that cross modules.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
MEMORY = 2 * 1024**3
TIMEOUT = 120

pytestmark = pytest.mark.integration


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY, MEMORY))


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file() or p.is_symlink()}


class Tenant:
    """A working folder with a bucket, the engine's data folder, and a record of what gets written."""

    def __init__(self, root: Path) -> None:
        self.root, self.bucket, self.data = root, root / "bucket", root / "finetune-data"
        (self.bucket / "data").mkdir(parents=True)
        shutil.copy(ROOT / "recipes" / "data" / "quickstart.jsonl", self.bucket / "data" / "quickstart.jsonl")
        self.recipe(name="hostile")

    def recipe(self, **changes: object) -> Path:
        doc = yaml.safe_load((ROOT / "recipes" / "quickstart.yaml").read_text())
        for key, value in changes.items():
            doc[key] = {**doc[key], **value} if key == "data" and isinstance(value, dict) else value
        path = self.bucket / "recipe.yaml"
        path.write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8")
        return path

    def run(self, *args: str, job: Path | None = None) -> tuple[int, str]:
        """The command's exit code and output; ``job`` is the one more folder it may write into."""
        before = _files(self.root)
        env = {**os.environ, "FINETUNE_DATA_DIR": str(self.data), "OMP_NUM_THREADS": "1"}
        done = subprocess.run(
            [sys.executable, "-m", "finetune.cli", *args], cwd=self.root, env=env, capture_output=True, text=True,
            timeout=TIMEOUT, preexec_fn=_limit_memory,
        )  # fmt: skip
        allowed = [self.data] + ([job] if job is not None else [])
        written = [p for p in _files(self.root) - before if not any(p.is_relative_to(a) for a in allowed)]
        assert written == [], f"written outside the engine's folders: {written}"
        assert "Traceback" not in done.stderr, done.stderr[-3000:]
        return done.returncode, done.stdout + done.stderr


@pytest.fixture
def tenant(tmp_path: Path) -> Tenant:
    return Tenant(tmp_path)


def test_a_linked_file_inside_a_folder_dataset_is_refused_by_name(tenant: Tenant) -> None:
    folder = tenant.bucket / "data"
    (folder / "passwd.jsonl").symlink_to("/etc/passwd")
    code, out = tenant.run("data", "inspect", str(tenant.recipe(data={"path": "data"})), "--json")
    assert code == 2 and "passwd.jsonl" in out and "link" in out, out[-2000:]
    assert "root:" not in out  # nothing of the linked file was read


def test_a_lone_surrogate_is_a_located_row_problem(tenant: Tenant) -> None:
    rows = tenant.bucket / "data" / "quickstart.jsonl"
    with rows.open("a", encoding="utf-8") as fh:
        fh.write('{"messages": [{"role": "user", "content": "\\ud800"}, {"role": "assistant", "content": "x"}]}\n')
    code, out = tenant.run("data", "inspect", str(tenant.recipe()))
    assert code == 2 and "quickstart.jsonl:53" in out and "surrogate" in out, out[-2000:]


def test_a_denied_developer_in_disguise_is_refused_at_the_field(tenant: Tenant) -> None:
    custom = {"custom": {"path": "models/mine", "developer": "深度求索", "country": "TW"}}
    code, out = tenant.run("validate", str(tenant.recipe(model=custom)))
    assert code == 2 and "model.custom.developer" in out and "DeepSeek" in out, out


def test_a_custom_model_with_code_is_refused_before_anything_runs(tenant: Tenant) -> None:
    model = tenant.bucket / "models" / "mine"
    code, _ = tenant.run("models", "materialize", "smollm2-135m-instruct", "--tiny", "--dest", str(model), job=model)
    assert code == 0
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModelForCausalLM": "x.Model"}}))
    (model / "x.py").write_text("open('/tmp/pwned-by-custom-code', 'w')\n")
    custom = {"custom": {"path": "models/mine", "developer": "Example Labs", "country": "TW"}}
    code, out = tenant.run("data", "inspect", str(tenant.recipe(model=custom)))
    assert code == 2 and ("auto_map" in out or "x.py" in out), out[-2000:]
    assert not Path("/tmp/pwned-by-custom-code").exists()


def test_a_job_folder_resumed_with_other_data_is_refused_saying_so(tenant: Tenant) -> None:
    from finetune.jobstore import JobStore
    from finetune.registry import Registry
    from finetune.settings import Settings
    from finetune.storage import Bucket
    from finetune.train.launch import plan_job
    from finetune.validate import load_recipe

    recipe = tenant.recipe()
    settings = Settings(data_dir=tenant.data)
    registry = Registry.load(settings.registry, settings.lock_path)
    job = tenant.root / "job"
    plan_job(load_recipe(recipe, registry), Bucket.folder(tenant.bucket), JobStore.folder(job), settings,
             registry=registry)  # fmt: skip
    rows = tenant.bucket / "data" / "quickstart.jsonl"
    rows.write_text(rows.read_text(encoding="utf-8").replace("首都", "首府"), encoding="utf-8")
    code, out = tenant.run("train", str(recipe), "--output", str(job), job=job)
    assert code == 2 and "the dataset" in out and "differ" in out, out[-2000:]
    assert not (job / "checkpoints").exists()


def test_a_dataset_path_linked_out_of_the_bucket_is_refused(tenant: Tenant) -> None:
    outside = tenant.root / "elsewhere.jsonl"
    shutil.copy(tenant.bucket / "data" / "quickstart.jsonl", outside)
    (tenant.bucket / "data" / "quickstart.jsonl").unlink()
    (tenant.bucket / "data" / "quickstart.jsonl").symlink_to(outside)
    code, out = tenant.run("data", "inspect", str(tenant.recipe()))
    assert code == 2 and "data/quickstart.jsonl" in out and "link" in out, out[-2000:]


def test_a_recipe_name_is_never_a_path(tenant: Tenant) -> None:
    code, out = tenant.run("train", str(tenant.recipe(name="../../escaped")))
    assert code == 2 and "name" in out, out[-2000:]
    assert not (tenant.root.parent / "escaped").exists()
