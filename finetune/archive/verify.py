"""``finetune archive verify``: is this archive complete, untouched, and the model the engine trained?

Checks, each problem naming its file:

1. members: plain files and folders only, safe relative names under one top folder (a member
   named ``../x``, an absolute name, a link or a device is reported and never written out);
2. completeness and integrity: every file the manifest lists is there with its size and sha256,
   and nothing is there that the manifest does not list;
3. the model: ``model/`` loads with plain ``transformers`` (safetensors, no remote code), its
   tokenizer renders the fixed prompt to the same ids, its logits equal the engine's reference
   within the stated tolerance, and its generation config stops at the end-of-turn token;
4. the adapter: ``adapter/`` loads with ``peft`` on the base model, when the base model is at
   hand (the local model store, or ``--base DIR``) and is the one the manifest names (digests);
   the same logits check.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from finetune.archive.layout import ADAPTER_DIR, FORMAT, FORMAT_VERSION, MANIFEST, MERGED_DIR
from finetune.archive.source import quiet_peft
from finetune.archive.weights import allowed_difference
from finetune.hashing import sha256_file
from finetune.offline import LOAD_KWARGS


@dataclass
class Problem:
    file: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.message}"


@dataclass
class VerifyReport:
    archive: Path
    problems: list[Problem] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    manifest: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, file: str, message: str) -> None:
        self.problems.append(Problem(file, message))

    def as_dict(self) -> dict[str, Any]:
        return {
            "archive": str(self.archive),
            "ok": self.ok,
            "problems": [{"file": p.file, "problem": p.message} for p in self.problems],
            "checks": self.checks,
            "notes": self.notes,
        }


def _read_manifest(root: Path, report: VerifyReport) -> dict[str, Any] | None:
    path = root / MANIFEST
    if not path.is_file():
        report.add(MANIFEST, "missing: this is not a finetune model archive, or the manifest was removed")
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        report.add(MANIFEST, f"not valid JSON ({exc})")
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        report.add(MANIFEST, f"not a manifest of format '{FORMAT}'")
        return None
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        report.add(MANIFEST, f"format version {version!r} is newer than this engine reads ({FORMAT_VERSION})")
        return None
    if not isinstance(manifest.get("files"), dict):
        report.add(MANIFEST, "lists no files")
        return None
    return manifest


def _check_files(root: Path, present: list[str], manifest: dict[str, Any], report: VerifyReport) -> set[str]:
    """Sizes and digests; returns the names that failed (missing, changed or added)."""
    bad: set[str] = set()
    listed: dict[str, Any] = manifest["files"]
    for name, entry in sorted(listed.items()):
        path = root / name
        if name not in present or not path.is_file():
            report.add(name, "missing (listed in the manifest)")
        elif path.stat().st_size != entry.get("size"):
            report.add(name, f"size {path.stat().st_size} differs from the manifest's {entry.get('size')}: modified")
        elif sha256_file(path) != entry.get("sha256"):
            report.add(name, "sha256 differs from the manifest's: modified")
        else:
            continue
        bad.add(name)
    for name in sorted(set(present) - set(listed) - {MANIFEST}):
        report.add(name, "not listed in the manifest: added after the archive was built")
        bad.add(name)
    if not bad:
        report.checks.append(f"{len(listed)} files present with the manifest's sizes and sha256")
    return bad


def _reference(root: Path, manifest: dict[str, Any]) -> tuple[list[int], torch.Tensor]:
    from safetensors.torch import load_file

    tensors = load_file(str(root / manifest["verification"]["file"]))
    return tensors["input_ids"].tolist(), tensors["logits"]


def _compare(name: str, logits: torch.Tensor, ref: torch.Tensor, tol: float, report: VerifyReport) -> None:
    if logits.shape != ref.shape:
        report.add(name, f"logits of shape {tuple(logits.shape)}, the reference has {tuple(ref.shape)}")
        return
    allowed = allowed_difference(ref, tol)
    diff = float((logits - ref).abs().max())
    if diff > allowed:
        report.add(name, f"logits differ from the engine's by up to {diff:.3g} (allowed {allowed:.3g})")
    else:
        report.checks.append(f"{name}: logits equal the engine's (max |diff| {diff:.2e}, allowed {allowed:.2e})")


def _check_merged(root: Path, manifest: dict[str, Any], report: VerifyReport) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.archive.weights import logits_of, prompt_ids

    folder = root / MERGED_DIR
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), **LOAD_KWARGS)
        model = AutoModelForCausalLM.from_pretrained(
            str(folder), **LOAD_KWARGS, dtype=torch.float32, use_safetensors=True
        ).eval()
        generation = json.loads((folder / "generation_config.json").read_text(encoding="utf-8"))
    except Exception as exc:  # any loading failure is the finding
        report.add(f"{MERGED_DIR}/", f"does not load with transformers: {type(exc).__name__}: {exc}")
        return
    report.checks.append(f"{MERGED_DIR}/ loads with transformers.AutoModelForCausalLM and AutoTokenizer")
    ids, ref = _reference(root, manifest)
    if prompt_ids(tokenizer) != ids:
        report.add(f"{MERGED_DIR}/tokenizer.json", "renders the verification prompt to other ids than the engine's")
        return
    _compare(f"{MERGED_DIR}/", logits_of(model, ids), ref, manifest["verification"]["tolerance"]["merged"], report)
    eos = generation.get("eos_token_id")
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    missing = [i for i in manifest.get("stop_token_ids", []) if i not in eos]
    if missing:
        report.add(f"{MERGED_DIR}/generation_config.json", f"EOS ids {eos} lack the stop tokens {missing}")
    else:
        report.checks.append(f"{MERGED_DIR}/generation_config.json stops at {eos} (end of turn included)")


def _find_base(manifest: dict[str, Any], base: Path | None) -> Path | None:
    if base is not None:
        return base
    from finetune.modelstore import model_dir
    from finetune.settings import get_settings

    info = manifest["base_model"]
    if not info.get("revision"):
        return None
    folder = model_dir(get_settings().store_path, info["id"], info["revision"])
    return folder if (folder / "config.json").is_file() else None


def _check_adapter(root: Path, manifest: dict[str, Any], base: Path | None, report: VerifyReport) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from finetune.archive.weights import logits_of

    folder = root / ADAPTER_DIR
    base_dir = _find_base(manifest, base)
    info = manifest["base_model"]
    if base_dir is None:
        report.notes.append(
            f"{ADAPTER_DIR}/: not loaded: base model '{info['id']}' ({info.get('revision')}) is not in the local model "
            "store; pass --base DIR to check it"
        )
        return
    for name, entry in info.get("files", {}).items():
        path = base_dir / name
        if not name.endswith(".safetensors"):
            continue
        if not path.is_file() or sha256_file(path) != entry["sha256"]:
            report.add(f"{ADAPTER_DIR}/", f"the base model at {base_dir} is not the one it was trained on ({name})")
            return
    try:
        base_model = AutoModelForCausalLM.from_pretrained(str(base_dir), **LOAD_KWARGS, dtype=torch.float32)
        with quiet_peft():
            model = PeftModel.from_pretrained(base_model, str(folder), is_trainable=False, **LOAD_KWARGS).eval()
    except Exception as exc:  # any loading failure is the finding
        report.add(f"{ADAPTER_DIR}/", f"does not load with peft on the base model: {type(exc).__name__}: {exc}")
        return
    report.checks.append(f"{ADAPTER_DIR}/ loads with peft.PeftModel on the base model at {base_dir}")
    ids, ref = _reference(root, manifest)
    _compare(f"{ADAPTER_DIR}/", logits_of(model, ids), ref, manifest["verification"]["tolerance"]["adapter"], report)


def verify_archive(path: Path, *, base: Path | None = None, load: bool = True) -> VerifyReport:
    """Check ``path`` as the module docstring says; every problem is collected, none raised."""
    import tarfile

    from finetune.archive.tarball import safe_extract

    report = VerifyReport(path)
    if not path.is_file():
        report.add(str(path), "no such file")
        return report
    with tempfile.TemporaryDirectory(prefix="finetune-verify-") as tmp:
        try:
            extracted = safe_extract(path, Path(tmp))
        except (tarfile.TarError, OSError, EOFError) as exc:
            report.add(path.name, f"not a readable tar file: {exc}")
            return report
        for name, problem in extracted.problems:
            report.add(name, f"refused: {problem}")
        if extracted.top is None:
            report.add(path.name, "empty archive")
            return report
        root = Path(tmp) / extracted.top
        manifest = _read_manifest(root, report)
        if manifest is None:
            return report
        report.manifest = manifest
        bad = _check_files(root, extracted.files, manifest, report)
        contents = manifest.get("contents", {})
        if not load:
            report.notes.append("models not loaded (--no-load)")
            return report
        for key, folder, check in (("merged", MERGED_DIR, _check_merged), ("adapter", ADAPTER_DIR, None)):
            if key not in contents:
                continue
            if any(name.startswith(f"{folder}/") for name in bad) or manifest["verification"]["file"] in bad:
                report.notes.append(f"{folder}/: not loaded, its files failed the integrity check")
            elif check is not None:
                check(root, manifest, report)
            else:
                _check_adapter(root, manifest, base, report)
    return report
