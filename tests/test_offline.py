"""Offline by construction: importing the engine switches the Hugging Face libraries offline,
and no code path asks for remote code or pickle weights (DESIGN.md, invariant 3)."""

import io
import os
import re
import subprocess
import sys
import tokenize
from pathlib import Path

import finetune
from finetune.offline import LOAD_KWARGS, OFFLINE_ENV

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted([*(ROOT / "finetune").rglob("*.py"), *(ROOT / "workers").rglob("*.py")])


def test_importing_finetune_sets_offline_mode():
    assert finetune.__version__
    for key, value in OFFLINE_ENV.items():
        assert os.environ[key] == value


def test_offline_mode_holds_in_a_fresh_interpreter_even_if_the_caller_said_otherwise():
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0"}
    code = "import finetune, huggingface_hub.constants as c; print(c.HF_HUB_OFFLINE)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def test_load_kwargs_are_local_only_and_never_remote_code():
    assert LOAD_KWARGS == {"local_files_only": True, "trust_remote_code": False}


def _code_only(path: Path) -> str:
    """The source without comments and string literals (docstrings may explain what code must not do)."""
    tokens = tokenize.generate_tokens(io.StringIO(path.read_text(encoding="utf-8")).readline)
    return " ".join(t.string for t in tokens if t.type not in (tokenize.COMMENT, tokenize.STRING))


def test_no_source_enables_remote_code_or_pickle_loading():
    offenders = []
    for path in SOURCES:
        text = _code_only(path)
        if re.search(r"trust_remote_code\s*=\s*True", text):
            offenders.append(f"{path.name}: trust_remote_code=True")
        if re.search(r"pickle\s*\.\s*loads?\s*\(|weights_only\s*=\s*False", text):
            offenders.append(f"{path.name}: pickle loading")
        for call in re.finditer(r"torch\s*\.\s*load\s*\(", text):  # only torch's restricted unpickler (no code runs)
            if not re.match(r"[^()]*(\([^()]*\)[^()]*)*weights_only\s*=\s*True", text[call.end() :]):
                offenders.append(f"{path.name}: torch.load without weights_only=True")
        for call in re.finditer(r"\.\s*from_pretrained\s*\(", text):
            if "LOAD_KWARGS" not in text[call.end() : call.end() + 200]:
                offenders.append(f"{path.name}: from_pretrained without LOAD_KWARGS")
    assert offenders == []


def test_the_library_never_imports_the_entry_points():
    """``finetune/`` is the library; ``workers/`` holds thin entry points on top of it, never below it."""
    offenders = []
    for path in sorted((ROOT / "finetune").rglob("*.py")):
        if re.search(r"\b(from|import)\s+workers\b", _code_only(path)):
            offenders.append(path.relative_to(ROOT).as_posix())
    assert offenders == []


def test_settings_are_passed_in_not_read_deep_inside_the_library():
    """Environment variables are read by the settings (and the offline switches set), nowhere else."""
    # cluster.py starts the local Ray head and hands Ray jobs their environment
    allowed = {"settings.py", "offline.py", "cli.py", "run.py", "ray_launch.py", "loading.py", "cluster.py"}
    offenders = []
    for path in sorted((ROOT / "finetune").rglob("*.py")):
        if path.name not in allowed and re.search(r"os\s*\.\s*(environ|getenv)", _code_only(path)):
            offenders.append(path.relative_to(ROOT).as_posix())
    assert offenders == []
