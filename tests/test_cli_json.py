"""Every ``--json`` command prints only JSON on standard output, run as a real process.

In-process tests (``redirect_stdout``) cannot see what libraries write to file descriptor 1, nor
what a first run prints while it builds a tiny model; a real ``finetune`` process in a fresh data
folder can.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"
MODEL = "smollm2-135m-instruct"


def finetune(*args: str, data_dir: Path) -> tuple[int, Any, str]:
    """Run ``finetune ARGS`` in a process with its own data folder: exit code, parsed stdout, stderr."""
    done = subprocess.run(
        [sys.executable, "-m", "finetune.cli", *args],
        cwd=ROOT,
        env={**os.environ, "FINETUNE_DATA_DIR": str(data_dir)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    try:
        parsed = json.loads(done.stdout)
    except json.JSONDecodeError as exc:
        pytest.fail(f"stdout is not JSON ({exc}):\n{done.stdout[:2000]}\nstderr:\n{done.stderr[-2000:]}")
    return done.returncode, parsed, done.stderr


@pytest.fixture(scope="module")
def shared_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One data folder for the commands that do not need a fresh one (the tiny model is built once)."""
    return tmp_path_factory.mktemp("finetune-data")


def chat(q: str, a: str) -> str:
    return json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})


def refused_bucket(folder: Path) -> Path:
    """A bucket whose dataset is 60% exact duplicates plus 5 bad rows (lines 96-100); its recipe."""
    good = [chat(f"question {i}", f"answer {i}") for i in range(35)]
    bad = ['{"messages": [{"role": "user", "content": "no answer"}]}', "{broken", "[]", '{"messages": []}', "{"]
    data = folder / "data" / "train.jsonl"
    data.parent.mkdir(parents=True)
    data.write_text("\n".join(good + [good[i % 35] for i in range(60)] + bad) + "\n", encoding="utf-8")
    recipe = {"name": "refused", "model": {"id": MODEL, "tiny": True}, "data": {"path": "data/train.jsonl"}}
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------ fast commands


def test_validate_json_valid_and_invalid(shared_data):
    code, results, _ = finetune("validate", "--json", str(QUICKSTART), data_dir=shared_data)
    assert code == 0 and results == [{"file": str(QUICKSTART), "valid": True, "issues": []}]
    bad = ROOT / "tests" / "fixtures" / "bad_recipes" / "unknown_key.yaml"
    code, results, _ = finetune("validate", "--json", str(bad), data_dir=shared_data)
    assert code == 2 and results[0]["valid"] is False
    assert {"file", "line", "path", "message", "hint"} <= set(results[0]["issues"][0])


def test_models_list_and_show_json(shared_data):
    code, entries, _ = finetune("models", "list", "--json", data_dir=shared_data)
    assert code == 0 and MODEL in {e["id"] for e in entries}
    code, entry, _ = finetune("models", "show", MODEL, "--json", data_dir=shared_data)
    assert code == 0 and entry["id"] == MODEL and entry["verdict"]["decision"] == "allow"
    code, error, err = finetune("models", "show", "gemma-3-1b", "--json", data_dir=shared_data)
    assert code == 2 and "unknown model 'gemma-3-1b'" in err
    assert error["fault"] == "tenant" and "unknown model 'gemma-3-1b'" in error["issues"][0]["message"]


def test_an_invalid_recipe_is_a_json_error(shared_data):
    bad = ROOT / "tests" / "fixtures" / "bad_recipes" / "unknown_key.yaml"
    code, error, err = finetune("data", "inspect", str(bad), "--json", data_dir=shared_data)
    assert code == 2 and "learning_rte" in err
    assert error["error"] and any(i["path"] == "training.learning_rte" for i in error["issues"])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="calls the C library's printf through ctypes")
def test_what_libraries_print_goes_to_stderr_even_from_c(tmp_path):
    script = textwrap.dedent(
        """
        import ctypes, os, sys
        from finetune import cli

        def noisy(args, settings):
            print("python print")
            os.write(1, b"fd write\\n")
            ctypes.CDLL(None).printf(b"c printf\\n")
            cli._print_json({"ok": True})
            return 0

        cli.cmd_schema = noisy
        code = cli.main(["schema"])
        print("after")
        sys.exit(code)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env={**os.environ, "FINETUNE_DATA_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == '{\n  "ok": true\n}\nafter\n'  # results, then stdout is stdout again
    assert "python print" in done.stderr and "fd write" in done.stderr and "c printf" in done.stderr


# ------------------------------------------------------------------------------------ commands that build a model


@pytest.mark.integration
def test_data_inspect_json_on_a_first_run(tmp_path):
    # A fresh data folder: the tiny model is built now, and DeepSpeed announces its accelerator.
    code, report, _ = finetune("data", "inspect", str(QUICKSTART), "--json", data_dir=tmp_path)
    assert code == 0 and report["rows_used"] == 52 and report["duplicates_policy"] == "drop"
    saved = json.loads((tmp_path / "reports" / "quickstart" / "data_report.json").read_text(encoding="utf-8"))
    assert saved == report


@pytest.mark.integration
def test_data_inspect_json_on_a_refused_dataset(tmp_path, shared_data):
    recipe = refused_bucket(tmp_path / "bucket")
    code, error, err = finetune(
        "data", "inspect", str(recipe), "--bucket", str(recipe.parent), "--json", data_dir=shared_data
    )
    assert code == 2
    assert error["error"].startswith("5 of 40 distinct rows cannot be used")
    assert [(i["file"], i["line"]) for i in error["issues"]] == [("data/train.jsonl", n) for n in range(96, 101)]
    assert all(set(i) == {"file", "line", "path", "message", "hint"} for i in error["issues"])
    report = error["report"]
    assert (report["rows_read"], report["duplicates"], report["problems_total"]) == (100, 60, 5)
    path = shared_data / "reports" / "refused" / "data_report.json"
    assert json.loads(path.read_text(encoding="utf-8")) == report and str(path) in err


@pytest.mark.integration
def test_estimate_json(shared_data):
    code, estimate, err = finetune("estimate", "--json", str(QUICKSTART), "--gpu", "cpu", data_dir=shared_data)
    assert "error" not in estimate, err[-4000:]
    assert code in (0, 1) and estimate["name"] == "quickstart" and estimate["device"]["kind"] == "cpu"
