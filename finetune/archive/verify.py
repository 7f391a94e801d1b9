"""``finetune archive verify``: is this archive complete, untouched, and the model the engine trained?

Checks, each problem naming its file:

1. the manifest: the archive's first file, of a bounded size and nesting, signed with the platform
   key, of the expected shape, every path it names inside the archive's top folder; nothing else
   is read from an archive whose manifest fails (re-digested files prove nothing unsigned);
2. members: plain files and folders only, safe relative names under one top folder (a member
   named ``../x``, an absolute name, a link or a device is reported and never written out), none
   written that the manifest does not list or past its declared size;
3. completeness and integrity: every file the manifest lists is there with its size and sha256,
   and nothing is there that the manifest does not list;
4. the model: ``model/`` loads with plain ``transformers`` (safetensors, no remote code), its
   tokenizer renders the fixed prompt to the same ids, its logits equal the engine's reference
   within the verifier's tolerance for the weights' dtype (:data:`~finetune.archive.layout.TOLERANCE`;
   the manifest's stated one is not read), and its generation config stops at the end-of-turn token;
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

from finetune.archive.layout import ADAPTER_DIR, ADAPTER_TOLERANCE, MANIFEST, MERGED_DIR, TOLERANCE
from finetune.archive.manifest import MANIFEST_MAX_BYTES, Manifest, read_manifest
from finetune.archive.source import quiet_peft
from finetune.archive.tarball import Extracted, Unreadable, open_tar
from finetune.archive.weights import allowed_difference
from finetune.hashing import sha256_file
from finetune.offline import LOAD_KWARGS
from finetune.signing import VerifyKey


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


def _read_manifest(data: bytes, key: VerifyKey | None, report: VerifyReport) -> Manifest | None:
    read = read_manifest(data, key)
    for problem in read.problems:
        report.add(MANIFEST, problem)
    if read.manifest is None:
        report.notes.append("nothing else was checked: the manifest cannot be trusted")
        return None
    assert key is not None  # read_manifest trusts nothing without it
    report.manifest = read.raw
    report.checks.append(f"{MANIFEST} carries the platform's signature (key id {key.key_id})")
    return read.manifest


def _member_problems(extracted: Extracted, report: VerifyReport) -> None:
    for name, problem in extracted.problems:
        report.add(name, f"refused: {problem}")
    for name, (size, declared) in sorted(extracted.oversized.items()):
        report.add(name, f"{size:,} bytes, the manifest declares {declared:,}: modified (not written out)")


def _check_files(extracted: Extracted, manifest: Manifest, report: VerifyReport) -> set[str]:
    """Sizes and digests; returns the names that failed (missing, changed or added)."""
    bad: set[str] = set(extracted.oversized)
    for name, entry in sorted(manifest.files.items()):
        if name in bad:  # larger than declared: reported, not written out
            continue
        written = extracted.files.get(name)
        if written is None:
            report.add(name, "missing (listed in the manifest)")
        elif written[0] != entry.size:
            report.add(name, f"size {written[0]} differs from the manifest's {entry.size}: modified")
        elif written[1] != entry.sha256:
            report.add(name, "sha256 differs from the manifest's: modified")
        else:
            continue
        bad.add(name)
    for name in sorted(extracted.unlisted):
        report.add(name, "not listed in the manifest: added after the archive was built (not written out)")
        bad.add(name)
    if not bad:
        report.checks.append(f"{len(manifest.files)} files present with the manifest's sizes and sha256")
    return bad


def _reference(root: Path, manifest: Manifest, report: VerifyReport) -> tuple[list[int], torch.Tensor] | None:
    from safetensors.torch import load_file

    name = manifest.verification.file
    try:
        tensors = load_file(str(root / name))
        return [int(i) for i in tensors["input_ids"].tolist()], tensors["logits"].float()
    except Exception as exc:  # a reference that cannot be read is the finding
        report.add(name, f"not a reference of input ids and logits: {type(exc).__name__}: {exc}")
        return None


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


def _check_merged(root: Path, manifest: Manifest, report: VerifyReport) -> None:
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
    reference = _reference(root, manifest, report)
    if reference is None:
        return
    ids, ref = reference
    if prompt_ids(tokenizer) != ids:
        report.add(f"{MERGED_DIR}/tokenizer.json", "renders the verification prompt to other ids than the engine's")
        return
    _compare(f"{MERGED_DIR}/", logits_of(model, ids), ref, TOLERANCE[manifest.weights_dtype], report)
    eos = generation.get("eos_token_id") if isinstance(generation, dict) else None
    eos = [eos] if isinstance(eos, int) else list(eos) if isinstance(eos, list) else []
    missing = [i for i in manifest.stop_token_ids if i not in eos]
    if missing:
        report.add(f"{MERGED_DIR}/generation_config.json", f"EOS ids {eos} lack the stop tokens {missing}")
    else:
        report.checks.append(f"{MERGED_DIR}/generation_config.json stops at {eos} (end of turn included)")


def _find_base(manifest: Manifest, base: Path | None) -> Path | None:
    if base is not None:
        return base
    from finetune.modelstore import model_dir
    from finetune.settings import get_settings

    info = manifest.base_model  # id and revision are single plain names (the schema's)
    if not info.revision:
        return None
    folder = model_dir(get_settings().store_path, info.id, info.revision)
    return folder if (folder / "config.json").is_file() else None


def _check_adapter(root: Path, manifest: Manifest, base: Path | None, report: VerifyReport) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from finetune.archive.weights import logits_of

    folder = root / ADAPTER_DIR
    base_dir = _find_base(manifest, base)
    info = manifest.base_model
    if base_dir is None:
        report.notes.append(
            f"{ADAPTER_DIR}/: not loaded: base model '{info.id}' ({info.revision}) is not in the local model "
            "store; pass --base DIR to check it"
        )
        return
    for name, entry in info.files.items():  # names are relative, inside the base folder (the schema's)
        path = base_dir / name
        if not name.endswith(".safetensors"):
            continue
        if not path.is_file() or sha256_file(path) != entry.sha256:
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
    reference = _reference(root, manifest, report)
    if reference is not None:
        _compare(f"{ADAPTER_DIR}/", logits_of(model, reference[0]), reference[1], ADAPTER_TOLERANCE, report)


def verify_archive(path: Path, *, key: VerifyKey | None, base: Path | None = None, load: bool = True) -> VerifyReport:
    """Check ``path`` as the module docstring says; every problem is collected, none raised.

    Args:
        path: The archive (``.tar`` or ``.tar.zst``).
        key: The platform's public key; None when it is not at hand, which fails the check (an
            archive whose signature cannot be checked proves nothing).
        base: The base model's folder, for loading the adapter (default: the local model store's).
        load: Load the models and compare their logits (else members and digests only).
    """
    report = VerifyReport(path)
    if not path.is_file():
        report.add(str(path), "no such file")
        return report
    with tempfile.TemporaryDirectory(prefix="finetune-verify-") as tmp:
        extracted = Extracted()
        try:
            with open_tar(path) as reader:
                _, data = reader.first(MANIFEST, MANIFEST_MAX_BYTES)
                manifest = _read_manifest(data, key, report)
                if manifest is None:
                    return report
                reader.extract(Path(tmp), manifest.sizes(), extracted)
        except Unreadable as exc:
            _member_problems(extracted, report)
            report.add(exc.file, exc.message)
            if report.manifest is not None:
                report.notes.append("reading stopped there: the rest of the archive was not checked")
            return report
        _member_problems(extracted, report)
        bad = _check_files(extracted, manifest, report)
        if not load:
            report.notes.append("models not loaded (--no-load)")
            return report
        assert extracted.top is not None
        _check_models(Path(tmp) / extracted.top, manifest, bad, base, report)
    return report


def _check_models(root: Path, manifest: Manifest, bad: set[str], base: Path | None, report: VerifyReport) -> None:
    for present, folder in ((manifest.contents.merged, MERGED_DIR), (manifest.contents.adapter, ADAPTER_DIR)):
        if present is None:
            continue
        if any(name.startswith(f"{folder}/") for name in bad) or manifest.verification.file in bad:
            report.notes.append(f"{folder}/: not loaded, its files failed the integrity check")
        elif folder == MERGED_DIR:
            _check_merged(root, manifest, report)
        else:
            _check_adapter(root, manifest, base, report)
