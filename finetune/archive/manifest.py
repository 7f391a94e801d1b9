"""``manifest.json``: its schema, and reading it as untrusted input (size, nesting, signature, shape).

An archive passes through tenants' hands, so its manifest proves nothing until the platform's
signature over it checks out; its shape is checked too, so that a malformed one gives located
problems rather than a traceback. Every path it names stays inside the archive's top folder.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from finetune.archive.layout import FORMAT, FORMAT_VERSION, MANIFEST, member_problem
from finetune.signing import VerifyKey, signature_problem

#: The most a manifest may hold (one of a model with thousands of shards stays far below).
MANIFEST_MAX_BYTES = 16 * 1024 * 1024
#: The deepest nesting of JSON objects and lists a manifest may have (the engine writes about 6).
MAX_DEPTH = 64
#: Schema problems reported for one manifest; the rest are counted.
_MAX_SHOWN = 20


def _archive_path(value: str) -> str:
    problem = member_problem(value)
    if problem is not None:
        raise ValueError(f"not a file inside the archive ({problem})")
    return value


#: A path named by the manifest: relative, '/'-separated, no '..', no backslash.
ArchivePath = Annotated[str, AfterValidator(_archive_path)]
#: One path part (a model id, a revision): never a way out of the model store.
_PART = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"


class _Open(BaseModel):
    """Keys the verifier does not read are allowed (they are covered by the signature)."""

    model_config = ConfigDict(extra="allow", strict=True)


class FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class BaseFile(_Open):
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class Verification(_Open):
    file: ArchivePath


class BaseModelInfo(_Open):
    id: str = Field(pattern=_PART)
    revision: str | None = Field(default=None, pattern=_PART)
    files: dict[ArchivePath, BaseFile] = Field(default_factory=dict)


class Contents(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    merged: Literal["model"] | None = None  # MERGED_DIR
    adapter: Literal["adapter"] | None = None  # ADAPTER_DIR


class Manifest(_Open):
    """What the verifier reads from ``manifest.json``."""

    format: Literal["finetune-model-archive"]  # FORMAT
    format_version: int = Field(ge=1, le=FORMAT_VERSION)
    name: str
    contents: Contents
    weights_dtype: Literal["float32", "bfloat16", "float16"]
    stop_token_ids: list[int] = Field(default_factory=list)
    verification: Verification
    base_model: BaseModelInfo
    files: dict[ArchivePath, FileEntry]

    def sizes(self) -> dict[str, int]:
        """Every listed file's declared size, by its name under the top folder."""
        return {name: entry.size for name, entry in self.files.items()}


@dataclass
class ManifestRead:
    """The manifest when it can be trusted, and every problem found reading it."""

    manifest: Manifest | None = None
    raw: dict[str, Any] | None = None
    problems: list[str] = field(default_factory=list)  # each "where: what", located inside manifest.json


_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def _too_deep(data: bytes, limit: int) -> bool:
    """Whether the JSON text nests objects and lists deeper than ``limit`` (brackets in strings do not count)."""
    if data.count(b"[") + data.count(b"{") <= limit:
        return False
    depth = 0
    for match in _TOKENS.finditer(data):
        token = match.group()
        if token in (b"[", b"{"):
            depth += 1
            if depth > limit:
                return True
        elif token in (b"]", b"}"):
            depth -= 1
    return False


def _show(value: Any) -> str:
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_TYPE_WORDS = {"int": "a whole number", "float": "a number", "bool": "true or false", "string": "a string",
               "dict": "an object", "model": "an object", "list": "a list"}  # fmt: skip


def _message(error: Any) -> str:
    kind, ctx, value = error["type"], error.get("ctx") or {}, error.get("input")
    if kind == "missing":
        return "missing"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"must be an object (got {_show(value)})"
    if kind == "literal_error":
        return f"must be {ctx.get('expected')} (got {_show(value)})"
    if kind == "string_pattern_mismatch":
        return f"must match {ctx.get('pattern')} (got {_show(value)})"
    if kind == "value_error":
        return str(ctx.get("error", error["msg"]))
    if kind in ("greater_than_equal", "less_than_equal"):
        word = "at least" if kind == "greater_than_equal" else "at most"
        return f"must be {word} {next(iter(ctx.values()))} (got {_show(value)})"
    base = kind.split("_")[0]
    if base in _TYPE_WORDS and kind.endswith(("_type", "_parsing")):
        return f"must be {_TYPE_WORDS[base]} (got {_show(value)})"
    return str(error["msg"])


def _schema_problems(exc: ValidationError) -> list[str]:
    problems = []
    for error in exc.errors(include_url=False):
        loc = [str(part) for part in error["loc"]]
        key = bool(loc) and loc[-1] == "[key]"
        where = ".".join(loc[:-1] if key else loc) or "(top level)"
        problems.append(f"{where}: {'the name is ' if key else ''}{_message(error)}")
    if len(problems) > _MAX_SHOWN:
        problems[_MAX_SHOWN:] = [f"(and {len(problems) - _MAX_SHOWN} more)"]
    return problems


def _consistency_problems(manifest: Manifest) -> list[str]:
    problems = []
    if manifest.verification.file not in manifest.files:
        problems.append(f"verification.file: {manifest.verification.file!r} is not a file the manifest lists")
    if MANIFEST in manifest.files:
        problems.append(f"files.{MANIFEST}: the manifest cannot list itself")
    return problems


def read_manifest(data: bytes, key: VerifyKey | None) -> ManifestRead:
    """Parse and check ``manifest.json``'s bytes; ``manifest`` is set only when nothing is wrong.

    Args:
        data: The file's content (at most :data:`MANIFEST_MAX_BYTES`).
        key: The platform's public key; None when it is not at hand (the signature cannot be
            checked, which is a problem, never a pass).
    """
    result = ManifestRead()
    if len(data) > MANIFEST_MAX_BYTES:
        result.problems.append(f"{len(data):,} bytes: more than a manifest may hold ({MANIFEST_MAX_BYTES:,})")
        return result
    if _too_deep(data, MAX_DEPTH):
        result.problems.append(f"nested more than {MAX_DEPTH} levels deep: not a manifest the engine writes")
        return result
    try:
        raw = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        result.problems.append(f"not valid JSON ({exc})")
        return result
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        result.problems.append(f"not a manifest of format '{FORMAT}'")
        return result
    version = raw.get("format_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        result.problems.append(f"format version {version} is newer than this engine reads ({FORMAT_VERSION})")
        return result
    if key is None:
        result.problems.append(
            "the signature could not be checked: no platform public key is at hand (pass the published one with "
            "--public-key)"
        )
    else:
        problem = signature_problem(raw, key)
        if problem is not None:
            result.problems.append(problem if "signature" in problem else f"signature: {problem}")
    result.raw = raw
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as exc:
        result.problems.extend(_schema_problems(exc))
        return result
    result.problems.extend(_consistency_problems(manifest))
    if not result.problems:
        result.manifest = manifest
    return result
