"""The offline model store, and the checks every model folder passes before it is used.

Layout: ``<store>/<model-id>/<revision>/`` in Hugging Face format, plus ``models.lock.json`` that
pins each imported model's revision and file digests (the registry merges it on load). A tiny
random-weight variant of an entry lives at ``<store>/<model-id>/tiny-random/``.

Nothing is ever downloaded: models arrive as snapshot folders copied onto the machine and go
through :func:`import_snapshot`. Folders with pickle weights or custom code are refused outright,
since loading either can run arbitrary code (DESIGN.md, invariant 3); so are links, special files
and safetensors files whose header is not sound, since a hostile upload uses them to read or hang
on what it should not.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from finetune.errors import Issue, ModelCheckError, ModelStoreError
from finetune.origin import OriginFacts, Verdict, judge
from finetune.registry import FileDigest, ModelEntry, Registry, Status, is_commit, read_lock
from finetune.safetensors_header import read_header

PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz"})
CODE_SUFFIXES = frozenset({".py", ".pyc", ".pyo", ".so", ".dylib", ".dll", ".sh"})
IDENTITY_KEYS = (
    "model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "vocab_size",
)  # fmt: skip
TINY_REVISION = "tiny-random"
_CHUNK = 8 * 1024 * 1024
#: Config files are small; a bigger one is refused rather than parsed.
MAX_CONFIG_BYTES = 16 * 1024 * 1024
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
_LINK_REFUSED = "a link is refused: model folders hold plain files only (a link can reach files outside the folder)"


@dataclass(frozen=True)
class _Found:
    """A file accepted by the scan: its digest, and where its bytes are read (itself or its cache blob)."""

    digest: FileDigest
    source: Path


def _open_regular(path: Path | str, dir_fd: int | None = None) -> tuple[BinaryIO, int]:
    """Open a regular file without following a final link; its size from the open file.

    Raises:
        OSError: a link, a missing file, or anything but a regular file (``EINVAL``).
    """
    fd = os.open(path, _OPEN_FLAGS, dir_fd=dir_fd)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file")
    return os.fdopen(fd, "rb"), st.st_size


def _digest(fh: BinaryIO, size: int, rel: str) -> tuple[FileDigest | None, list[Issue]]:
    """The digest of an open file; a ``.safetensors`` file's header is checked first."""
    if rel.lower().endswith(".safetensors"):
        _, problems = read_header(fh, size, rel)
        if problems:
            return None, problems
        fh.seek(0)
    digest = hashlib.sha256()
    read = 0
    while chunk := fh.read(_CHUNK):
        digest.update(chunk)
        read += len(chunk)
    return FileDigest(sha256=digest.hexdigest(), size=read), []


def _cache_blobs(root: Path) -> Path | None:
    """The blob folder when ``root`` is a Hugging Face cache snapshot (``<repo>/snapshots/<rev>``)."""
    real = root.resolve()
    blobs = real.parent.parent / "blobs"
    return blobs if real.parent.name == "snapshots" and blobs.is_dir() else None


def _name_issue(rel: str) -> Issue | None:
    suffix = PurePosixPath(rel).suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        return Issue(
            "",
            "pickle weights are refused: loading them can run code",
            file=rel,
            hint="convert the weights to .safetensors",
        )
    if suffix in CODE_SUFFIXES:
        return Issue("", "custom code is refused: models must load with stock transformers", file=rel)
    return None


def _scan_file(dirpath: str, name: str, dir_fd: int, rel: str, blobs: Path | None) -> tuple[_Found | None, list[Issue]]:
    """Digest one directory entry, read as a plain file (or as the cache blob its link names)."""
    source = Path(dirpath) / name
    try:
        mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
        if stat.S_ISLNK(mode):
            if blobs is None:
                return None, [Issue("", _LINK_REFUSED, file=rel)]
            target = Path(os.path.realpath(source))
            if not target.is_relative_to(blobs):
                return None, [Issue("", f"links outside the cache's blob folder {blobs} (to {target})", file=rel)]
            source = target
            fh, size = _open_regular(target)
        elif not stat.S_ISREG(mode):
            return None, [Issue("", "not a regular file (a device, pipe or socket)", file=rel)]
        else:
            fh, size = _open_regular(name, dir_fd)
    except OSError as exc:
        return None, [Issue("", f"cannot be read as a plain file: {exc.strerror or exc}", file=rel)]
    with fh:
        digest, issues = _digest(fh, size, rel)
    return (None if digest is None else _Found(digest, source)), issues


def _scan(root: Path, *, cache_links: bool) -> tuple[dict[str, _Found], list[Issue]]:
    if not root.is_dir():
        raise ModelStoreError(f"{root} is not a folder")
    blobs = _cache_blobs(root) if cache_links else None
    issues: list[Issue] = []
    found: dict[str, _Found] = {}
    # fwalk opens each folder relative to its parent's descriptor without following links, so a
    # folder swapped for a link during the scan cannot lead it elsewhere.
    for dirpath, dirnames, filenames, dir_fd in os.fwalk(root, follow_symlinks=False):
        base = Path(dirpath).relative_to(root)
        kept = []
        for name in sorted(d for d in dirnames if not d.startswith(".")):
            try:
                is_link = stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
            except OSError as exc:
                issues.append(Issue("", f"cannot be read: {exc.strerror or exc}", file=(base / name).as_posix()))
                continue
            if is_link:
                issues.append(Issue("", _LINK_REFUSED, file=(base / name).as_posix()))
            else:
                kept.append(name)
        dirnames[:] = kept
        for name in sorted(filenames):
            rel = (base / name).as_posix()
            if name == ".gitattributes":
                continue
            problem = _name_issue(rel)
            if problem is not None:
                issues.append(problem)
                continue
            entry, problems = _scan_file(dirpath, name, dir_fd, rel, blobs)
            issues += problems
            if entry is not None:
                found[rel] = entry
    return found, issues


def _checked(root: Path, *, cache_links: bool) -> tuple[dict[str, _Found], list[Issue], dict[str, Any]]:
    """:func:`scan_folder`'s work, with where each file is read and the parsed ``config.json``."""
    found, issues = _scan(root, cache_links=cache_links)
    config: dict[str, Any] = {}
    for rel in sorted(found):
        if not rel.endswith("config.json"):
            continue
        data = _read_json(found[rel].source, issues, rel)
        if "auto_map" in data:
            issues.append(Issue("auto_map", "custom code is refused: the config asks for remote code", file=rel))
        if rel == "config.json":
            config = data
    seen = set(found) | {i.file for i in issues if i.file}  # a refused file is not also reported missing
    if "config.json" not in seen:
        issues.append(Issue("", "no config.json: not a Hugging Face model folder", file=str(root)))
    if not any(name.endswith(".safetensors") for name in seen):
        issues.append(Issue("", "no .safetensors weights found", file=str(root)))
    return found, issues, config


def scan_folder(root: Path, *, cache_links: bool = False) -> tuple[dict[str, FileDigest], list[Issue]]:
    """Hash every file under ``root`` and list what makes the folder unsafe or unusable.

    Only regular files are read: links, pipes and devices are refused by name, as are pickle
    weights, code files, a config asking for remote code (``auto_map`` in any ``*config.json``)
    and a safetensors file whose header is not sound. With ``cache_links``, a folder laid out as a
    Hugging Face cache snapshot (``<repo>/snapshots/<rev>/``) may link its files into
    ``<repo>/blobs/``, and nowhere else.

    Raises:
        ModelStoreError: ``root`` is not a folder.
    """
    found, issues, _ = _checked(root, cache_links=cache_links)
    return {rel: f.digest for rel, f in found.items()}, issues


def _read_json(path: Path, issues: list[Issue], rel: str) -> dict[str, Any]:
    try:
        fh, size = _open_regular(path)
        with fh:
            if size > MAX_CONFIG_BYTES:
                issues.append(Issue("", f"{size} bytes: more than the {MAX_CONFIG_BYTES} a config may have", file=rel))
                return {}
            data = json.loads(fh.read(MAX_CONFIG_BYTES).decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        issues.append(Issue("", f"unreadable JSON: {str(exc)[:200]}", file=rel))
        return {}
    return data if isinstance(data, dict) else {}


def read_config(root: Path) -> dict[str, Any]:
    """The ``config.json`` of a model folder ({} when it is missing, unreadable or a link)."""
    issues: list[Issue] = []
    return _read_json(root / "config.json", issues, "config.json")


def _copy(src: Path, dst: Path) -> None:
    """Copy one plain file (never through a final link); the copy is verified by the caller."""
    fh, _ = _open_regular(src)
    with fh, open(dst, "xb") as out:
        shutil.copyfileobj(fh, out, _CHUNK)


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


def check_folder(
    root: Path, developer: str, country: str, registry: Registry, *, cache_links: bool = True
) -> CheckReport:
    """Review an uploaded model: refuse unsafe folders, deny known denied checkpoints.

    Args:
        cache_links: Accept a Hugging Face cache snapshot's links into its own blob folder (see
            :func:`scan_folder`). Tenants' folders are checked without: any link is refused.

    Returns:
        A pending-review record (or a denied one) for an operator to decide on.

    Raises:
        ModelCheckError: the folder holds pickle weights, custom code, a link, a special file or a
            bad safetensors header, or is not a model folder.
    """
    found, issues, config = _checked(root, cache_links=cache_links)
    if issues:
        raise ModelCheckError(issues, f"model folder {root} is refused")
    files = {rel: f.digest for rel, f in found.items()}
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
    found, issues, config = _checked(src, cache_links=True)
    issues += _identity_issues(config, entry) if not issues else []
    if issues:
        raise ModelCheckError(issues, f"snapshot {src} is refused for '{model_id}'")
    files = {rel: f.digest for rel, f in found.items()}
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
        for name, item in found.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            _copy(item.source, tmp / name)
        copied, problems = scan_folder(tmp)
        if copied != files or problems:
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
