"""The offline model store, and the checks every model folder passes before it is used.

Layout: ``<store>/<model-id>/<revision>/`` in Hugging Face format, plus ``models.lock.json`` that
pins each imported model's revision and file digests (the registry merges it on load). A tiny
random-weight variant of an entry lives at ``<store>/<model-id>/tiny-random/``.

Nothing is ever downloaded: models arrive as snapshot folders copied onto the machine and go
through :func:`import_snapshot`. Folders with pickle weights or custom code are refused outright,
since loading either can run arbitrary code (DESIGN.md, invariant 3).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune.errors import Issue, ModelCheckError, ModelStoreError
from finetune.hashing import sha256_file
from finetune.origin import OriginFacts, Verdict, judge
from finetune.registry import FileDigest, ModelEntry, Registry, Status, is_commit, read_lock

PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz"})
CODE_SUFFIXES = frozenset({".py", ".pyc", ".pyo", ".so", ".dylib", ".dll", ".sh"})
CONFIG_FILES = ("config.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json")
IDENTITY_KEYS = (
    "model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "vocab_size",
)  # fmt: skip
TINY_REVISION = "tiny-random"


def _iter_files(root: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files += [Path(dirpath) / name for name in sorted(filenames) if name != ".gitattributes"]
    return files


def scan_folder(root: Path) -> tuple[dict[str, FileDigest], list[Issue]]:
    """Hash every file under ``root`` and list what makes the folder unsafe or unusable.

    Symbolic links are followed only when they resolve to a file (Hugging Face cache snapshots
    link into a blob folder); the content is what gets hashed and later copied.
    """
    if not root.is_dir():
        raise ModelStoreError(f"{root} is not a folder")
    issues: list[Issue] = []
    digests: dict[str, FileDigest] = {}
    for path in _iter_files(root):
        rel = path.relative_to(root).as_posix()
        suffix = path.suffix.lower()
        if suffix in PICKLE_SUFFIXES:
            issues.append(
                Issue(
                    "",
                    "pickle weights are refused: loading them can run code",
                    file=rel,
                    hint="convert the weights to .safetensors",
                )
            )
            continue
        if suffix in CODE_SUFFIXES:
            issues.append(Issue("", "custom code is refused: models must load with stock transformers", file=rel))
            continue
        if not path.resolve().is_file():
            issues.append(Issue("", "broken link", file=rel))
            continue
        digests[rel] = FileDigest(sha256=sha256_file(path), size=path.stat().st_size)
    for name in CONFIG_FILES:
        if name in digests and "auto_map" in _read_json(root / name, issues, name):
            issues.append(Issue("auto_map", "custom code is refused: the config asks for remote code", file=name))
    if "config.json" not in digests:
        issues.append(Issue("", "no config.json: not a Hugging Face model folder", file=str(root)))
    if not any(name.endswith(".safetensors") for name in digests):
        issues.append(Issue("", "no .safetensors weights found", file=str(root)))
    return digests, issues


def _read_json(path: Path, issues: list[Issue], rel: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        issues.append(Issue("", f"unreadable JSON: {exc}", file=rel))
        return {}
    return data if isinstance(data, dict) else {}


def read_config(root: Path) -> dict[str, Any]:
    issues: list[Issue] = []
    return _read_json(root / "config.json", issues, "config.json")


# ------------------------------------------------------------------------------- custom models


@dataclass
class CheckReport:
    """What ``finetune models check`` found about an uploaded model folder."""

    folder: str
    developer: str
    country: str
    verdict: Verdict
    files: dict[str, FileDigest]
    model_type: str | None
    architecture: dict[str, Any]
    identical_to: list[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        return {"allow": "approved", "review": "pending", "deny": "denied"}[self.verdict.decision.value]

    def as_dict(self) -> dict[str, Any]:
        return {
            "folder": self.folder,
            "status": self.status,
            "developer": self.developer,
            "country": self.country,
            "verdict": self.verdict.as_dict(),
            "model_type": self.model_type,
            "architecture": self.architecture,
            "identical_to": self.identical_to,
            "files": {name: d.model_dump() for name, d in self.files.items()},
        }


def _architecture_notes(config: dict[str, Any], registry: Registry) -> list[str]:
    notes = []
    model_type = config.get("model_type")
    for entry in registry.by_status(Status.DENIED):
        if model_type and model_type in entry.model_types:
            notes.append(
                f"architecture '{model_type}' is that of the denied family '{entry.id}'; "
                "architecture alone does not decide origin, so the weights' lineage needs review"
            )
        arch = entry.architecture
        if arch and all(config.get(k) == arch.get(k) for k in IDENTITY_KEYS if k in arch):
            notes.append(f"architecture is identical to the denied model '{entry.id}'; needs review")
    return notes


def check_folder(root: Path, developer: str, country: str, registry: Registry) -> CheckReport:
    """Review an uploaded model: refuse unsafe folders, deny known denied checkpoints.

    Returns a pending-review record (or a denied one) for an operator to decide on.

    Raises:
        ModelCheckError: the folder has pickle weights, custom code, or is not a model folder.
    """
    files, issues = scan_folder(root)
    if issues:
        raise ModelCheckError(issues, f"model folder {root} is refused")
    config = read_config(root)
    weights = {d.sha256 for name, d in files.items() if name.endswith(".safetensors")}
    denied = sorted({registry.denied_digests[s] for s in weights if s in registry.denied_digests})
    identical = sorted({registry.known_digests[s] for s in weights if s in registry.known_digests} - set(denied))
    facts = OriginFacts(
        developer=developer,
        country=country.upper(),
        digest_matches_denied=tuple(denied),
        architecture_notes=tuple(_architecture_notes(config, registry)),
        declared_only=True,
    )
    arch = {k: config[k] for k in IDENTITY_KEYS if k in config}
    return CheckReport(
        str(root), developer, country.upper(), judge(facts), files, config.get("model_type"), arch, identical
    )


# ------------------------------------------------------------------------------- the store


def model_dir(store: Path, model_id: str, revision: str) -> Path:
    return store / model_id / revision


def _identity_issues(config: dict[str, Any], entry: ModelEntry) -> list[Issue]:
    arch = entry.architecture or {}
    issues = []
    for key in IDENTITY_KEYS:
        if key in arch and config.get(key) != arch[key]:
            issues.append(
                Issue(
                    f"config.json:{key}",
                    f"is {config.get(key)!r} but registry entry '{entry.id}' says {arch[key]!r}",
                    hint="this is not that model, or the registry entry needs correcting",
                )
            )
    return issues


def _pick_revision(src: Path, entry: ModelEntry, revision: str | None) -> str:
    pinned = entry.source.revision if entry.source else None
    guessed = src.name if is_commit(src.name) else None
    chosen = revision or pinned or guessed
    if chosen is None:
        raise ModelStoreError(f"no revision known for '{entry.id}': pass --revision with the snapshot's commit")
    if pinned and chosen != pinned:
        raise ModelStoreError(f"'{entry.id}' is pinned to revision {pinned}, not {chosen}")
    if not is_commit(chosen):
        raise ModelStoreError(f"revision must be a 40-character commit id (got '{chosen}')")
    return chosen


def _write_lock(lock_path: Path, model_id: str, revision: str, files: dict[str, FileDigest]) -> None:
    lock = read_lock(lock_path)
    lock["models"][model_id] = {
        "revision": revision,
        "files": {name: d.model_dump() for name, d in sorted(files.items())},
        "imported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = lock_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(lock, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, lock_path)


def import_snapshot(
    src: Path, model_id: str, registry: Registry, store: Path, lock_path: Path, revision: str | None = None
) -> Path:
    """Verify a snapshot folder against the registry and copy it into the store.

    The first import of an entry pins its digests in the lock file; later imports must match.

    Raises:
        ModelStoreError: unknown or not-approved id, unknown revision, a digest mismatch.
        ModelCheckError: unsafe files (pickle, custom code) or a config that is not this model.
    """
    entry = registry.get(model_id)
    if entry is None:
        raise ModelStoreError(f"unknown model '{model_id}': add it to the registry first")
    if entry.status is not Status.APPROVED:
        raise ModelStoreError(
            f"'{model_id}' is {entry.status.value}: only approved models are imported ({entry.reason})"
        )
    rev = _pick_revision(src, entry, revision)
    files, issues = scan_folder(src)
    issues += _identity_issues(read_config(src), entry) if not issues else []
    if issues:
        raise ModelCheckError(issues, f"snapshot {src} is refused for '{model_id}'")
    expected = entry.files
    if expected and expected != files:
        diff = sorted(set(expected) ^ set(files)) or sorted(n for n in files if expected.get(n) != files[n])
        raise ModelStoreError(f"snapshot of '{model_id}' does not match its pinned digests: {', '.join(diff)}")
    dest = model_dir(store, model_id, rev)
    if dest.exists():
        have, _ = scan_folder(dest)
        if have != files:
            raise ModelStoreError(f"{dest} exists with different files; remove it to import again")
    else:
        tmp = dest.parent / f".tmp-{rev}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name in files:
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / name, tmp / name)
        copied, _ = scan_folder(tmp)
        if copied != files:
            shutil.rmtree(tmp, ignore_errors=True)
            raise ModelStoreError(f"copy of '{model_id}' into {dest} did not verify")
        os.replace(tmp, dest)
    if not expected:
        _write_lock(lock_path, model_id, rev, files)
    return dest


def resolve_model(registry: Registry, model_id: str, store: Path, *, tiny: bool = False) -> Path:
    """The store folder of an approved model, ready for ``from_pretrained`` with local files only.

    Raises:
        ModelStoreError: the model is not approved, or not in the store (with the command to fix it).
    """
    entry = registry.get(model_id)
    if entry is None or entry.status is not Status.APPROVED:
        raise ModelStoreError(f"'{model_id}' is not an approved model")
    if tiny:
        path = model_dir(store, model_id, TINY_REVISION)
        hint = f"finetune models materialize {model_id} --tiny"
    else:
        rev = entry.source.revision if entry.source else None
        if rev is None:
            raise ModelStoreError(
                f"'{model_id}' has not been imported: run `finetune models import SNAPSHOT_DIR --id {model_id}`"
            )
        path = model_dir(store, model_id, rev)
        hint = f"finetune models import SNAPSHOT_DIR --id {model_id}"
    if not (path / "config.json").is_file():
        raise ModelStoreError(f"'{model_id}' is not in the model store at {path}: run `{hint}`")
    return path
