"""The curated model registry: which models tenants may train, and everything known about them.

The registry is data (``model_registry.yaml``) read by this small loader. Each entry records the
source repository and pinned revision, the developer entity and country, the licence, the origin
of each component, the architecture needed to build the model with random weights, the chat
template and special tokens, the methods offered, and the expected file digests (filled in by
``finetune models import`` through the lock file). Families and repositories of denied origin are
entries too, so that a recipe naming them gets a reason instead of "unknown model".

Loading checks the file against :mod:`finetune.origin`: an entry marked ``approved`` whose facts
the policy would not allow is a registry error, so a careless edit cannot approve a PRC model.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import re
from collections.abc import Iterator
from enum import StrEnum
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from finetune.errors import Issue, RegistryError
from finetune.origin import Component, Decision, OriginFacts, Verdict, judge
from finetune.yamlio import load_yaml_located, pydantic_issues

ModelId = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._-]{1,79}$")]
CountryCode = Annotated[str, Field(pattern=r"^[A-Z]{2}$")]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
MethodName = Literal["full", "lora", "qlora"]
ComponentPart = Literal["base_weights", "tokenizer", "vision_encoder", "audio_encoder", "projector"]


class Status(StrEnum):
    APPROVED = "approved"
    PENDING = "pending"
    DENIED = "denied"


_STATUS_DECISION = {Status.APPROVED: Decision.ALLOW, Status.PENDING: Decision.REVIEW, Status.DENIED: Decision.DENY}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Developer(_Strict):
    entity: str = Field(min_length=1)
    country: CountryCode


class Source(_Strict):
    repo: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9._-]+$")
    revision: str | None = Field(default=None, description="Pinned commit; null until known.")


class ComponentSpec(_Strict):
    """Who produced one part of the model as it is shipped.

    ``base_weights`` is the entity that produced the weights being trained (the last trainer,
    not the ancestors): a fine-tune or distill published by a denied entity is denied through
    it. Ancestors go to ``ModelEntry.lineage``; a denied ancestor sends the model to review.
    """

    part: ComponentPart
    entity: str
    country: CountryCode
    source: str | None = None


class ChatSpec(_Strict):
    template: str = Field(description="Name of a template in the registry's chat_templates section.")
    bos: str | None = None
    eos: str
    eot: str = Field(description="Token that ends an assistant turn; generation stops on it.")
    pad: str | None = None
    extra_special: tuple[str, ...] = ()

    def special_tokens(self) -> list[str]:
        seen: dict[str, None] = {}
        for tok in (self.bos, self.eos, self.eot, self.pad, *self.extra_special):
            if tok:
                seen.setdefault(tok, None)
        return list(seen)


class FileDigest(_Strict):
    sha256: Sha256
    size: int = Field(ge=0)


class ModelEntry(_Strict):
    """One registry record: a model (trainable when approved) or a denied family of models."""

    id: ModelId
    kind: Literal["model", "family"] = "model"
    name: str
    status: Status
    reason: str | None = None
    developer: Developer
    license: str | None = None
    source: Source | None = None
    repos: tuple[str, ...] = Field(default=(), description="Repository globs (family entries, aliases).")
    params_b: float | None = Field(default=None, gt=0, description="Parameters, in billions.")
    model_types: tuple[str, ...] = Field(default=(), description="Architectures the family ships.")
    architecture: dict[str, Any] | None = None
    chat: ChatSpec | None = None
    methods: tuple[MethodName, ...] = ("full", "lora", "qlora")
    components: tuple[ComponentSpec, ...] = ()
    lineage: tuple[str, ...] = Field(default=(), description="Repositories the weights derive from.")
    files: dict[str, FileDigest] = Field(default_factory=dict)
    notes: str | None = None

    @property
    def eot(self) -> str | None:
        """The token that ends an assistant turn, when the entry has a chat format."""
        return self.chat.eot if self.chat is not None else None

    @model_validator(mode="after")
    def _shape(self) -> ModelEntry:
        if self.status is not Status.APPROVED and not self.reason:
            raise ValueError(f"a {self.status.value} entry needs a reason")
        if self.kind == "family" and not self.repos:
            raise ValueError("a family entry needs repos (glob patterns of its repositories)")
        if self.status is Status.APPROVED:
            if self.kind != "model":
                raise ValueError("only single models can be approved, not families")
            if self.source is None or self.architecture is None or self.chat is None:
                raise ValueError("an approved model needs source, architecture and chat")
        if self.architecture is not None and "model_type" not in self.architecture:
            raise ValueError("architecture needs a model_type")
        return self

    def config_kwargs(self) -> dict[str, Any]:
        """A deep copy of ``architecture`` for ``AutoConfig.for_model(**kwargs)``.

        transformers edits nested dicts it is given (rope settings), so the registry's own
        data must never be passed directly.
        """
        if self.architecture is None:
            raise KeyError(f"{self.id} has no architecture")
        return copy.deepcopy(self.architecture)

    @property
    def model_type(self) -> str | None:
        return None if self.architecture is None else str(self.architecture["model_type"])

    @property
    def max_seq_len(self) -> int | None:
        if self.architecture is None:
            return None
        value = self.architecture.get("max_position_embeddings")
        return int(value) if value is not None else None

    def weight_digests(self) -> list[FileDigest]:
        """Digests of the weight files only: configs and tokenizers are shared between families."""
        return [d for name, d in self.files.items() if name.endswith(".safetensors")]

    def all_repos(self) -> tuple[str, ...]:
        return ((self.source.repo,) if self.source else ()) + self.repos

    def matches_repo(self, repo: str) -> bool:
        return any(fnmatch.fnmatchcase(repo.lower(), pat.lower()) for pat in self.all_repos())

    def summary(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "kind": self.kind,
            "status": self.status.value,
            "developer": self.developer.entity,
            "country": self.developer.country,
            "license": self.license,
            "params_b": self.params_b,
            "model_type": self.model_type,
            "methods": list(self.methods),
            "reason": self.reason,
        }


class _RegistryFile(_Strict):
    version: Literal[1]
    chat_templates: dict[str, str]
    models: list[ModelEntry]


class Registry:
    """The loaded registry, merged with the lock file of imported digests."""

    def __init__(self, entries: list[ModelEntry], templates: dict[str, str], path: Path | None = None):
        self.path = path
        self.templates = templates
        self._entries = {e.id: e for e in entries}

    # ----------------------------------------------------------------------------- lookups
    def __iter__(self) -> Iterator[ModelEntry]:
        return iter(self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, model_id: str) -> ModelEntry | None:
        return self._entries.get(model_id)

    def ids(self) -> list[str]:
        return list(self._entries)

    def by_status(self, status: Status) -> list[ModelEntry]:
        return [e for e in self if e.status is status]

    def find_repo(self, repo: str) -> list[ModelEntry]:
        return [e for e in self if e.matches_repo(repo)]

    def chat_template(self, entry: ModelEntry) -> str:
        if entry.chat is None:
            raise KeyError(f"{entry.id} has no chat template")
        return self.templates[entry.chat.template]

    @cached_property
    def denied_digests(self) -> dict[str, str]:
        """sha256 of every weight file known for a denied entry -> that entry's id."""
        return {d.sha256: e.id for e in self.by_status(Status.DENIED) for d in e.weight_digests()}

    @cached_property
    def known_digests(self) -> dict[str, str]:
        """sha256 of every weight file known for any entry -> that entry's id."""
        return {d.sha256: e.id for e in self for d in e.weight_digests()}

    # ----------------------------------------------------------------------------- origin
    def denied_sources(self, repos: tuple[str, ...]) -> tuple[str, ...]:
        denied = self.by_status(Status.DENIED)
        return tuple(r for r in repos if any(e.matches_repo(r) for e in denied))

    def facts(self, entry: ModelEntry) -> OriginFacts:
        components = tuple(Component(c.part, c.entity, c.country, c.source) for c in entry.components)
        denied = self.denied_digests
        matches = tuple(sorted({denied[d.sha256] for d in entry.weight_digests() if d.sha256 in denied} - {entry.id}))
        return OriginFacts(
            developer=entry.developer.entity,
            country=entry.developer.country,
            components=components,
            lineage=entry.lineage,
            denied_lineage=self.denied_sources(entry.lineage),
            digest_matches_denied=matches,
        )

    def verdict(self, entry: ModelEntry) -> Verdict:
        """The policy verdict from the entry's facts, made at least as strict as its status."""
        verdict = judge(self.facts(entry))
        declared = _STATUS_DECISION[entry.status]
        if declared is not Decision.ALLOW:
            verdict.raise_to(declared, f"registry status {entry.status.value}: {entry.reason}")
        return verdict

    def consistency_issues(self) -> list[Issue]:
        issues: list[Issue] = []
        for entry in self:
            if entry.chat and entry.chat.template not in self.templates:
                issues.append(
                    Issue(f"models.{entry.id}.chat.template", f"no chat template named '{entry.chat.template}'")
                )
            if entry.status is Status.APPROVED:
                verdict = judge(self.facts(entry))
                if verdict.decision is not Decision.ALLOW:
                    why = "; ".join(verdict.reasons)
                    issues.append(
                        Issue(
                            f"models.{entry.id}.status",
                            f"marked approved but the origin policy says {verdict.decision.value}: {why}",
                        )
                    )
        return issues

    # ----------------------------------------------------------------------------- loading
    @classmethod
    def load(cls, path: Path, lock_path: Path | None = None) -> Registry:
        """Load and check the registry file, then merge the digests pinned in ``lock_path``.

        Raises:
            RegistryError: with every problem found, each located in the file.
        """
        doc = load_yaml_located(path)
        if doc.issues:
            raise RegistryError(doc.issues, f"model registry {path} is not valid")
        try:
            parsed = _RegistryFile.model_validate(doc.data)
        except ValidationError as exc:
            raise RegistryError(
                pydantic_issues(exc, doc, _RegistryFile), f"model registry {path} is not valid"
            ) from None
        issues = _duplicate_ids(parsed.models, doc)
        entries = parsed.models
        if lock_path is not None and lock_path.exists():
            entries, lock_issues = apply_lock(entries, lock_path)
            issues += lock_issues
        registry = cls(entries, parsed.chat_templates, path)
        issues += registry.consistency_issues()
        if issues:
            raise RegistryError(issues, f"model registry {path} is not valid")
        return registry


def _duplicate_ids(models: list[ModelEntry], doc: Any) -> list[Issue]:
    seen: set[str] = set()
    issues = []
    for i, entry in enumerate(models):
        if entry.id in seen:
            issues.append(
                Issue(
                    f"models.{i}.id", f"duplicate id '{entry.id}'", file=doc.file, line=doc.line_of(("models", i, "id"))
                )
            )
        seen.add(entry.id)
    return issues


def read_lock(lock_path: Path) -> dict[str, Any]:
    """Read the lock file written by ``finetune models import`` (an empty lock if absent)."""
    if not lock_path.exists():
        return {"version": 1, "models": {}}
    data = json.loads(lock_path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or data.get("version") != 1 or not isinstance(data.get("models"), dict):
        raise RegistryError(
            [Issue("", "not a version 1 lock file", file=str(lock_path))], "model lock file is not valid"
        )
    return data


def apply_lock(entries: list[ModelEntry], lock_path: Path) -> tuple[list[ModelEntry], list[Issue]]:
    """The entries with the revisions and digests pinned in the lock file, and any conflict."""
    lock = read_lock(lock_path)["models"]
    issues: list[Issue] = []
    merged = []
    for entry in entries:
        pinned = lock.get(entry.id)
        if not pinned:
            merged.append(entry)
            continue
        revision = pinned.get("revision")
        if entry.source and entry.source.revision and revision != entry.source.revision:
            issues.append(
                Issue(
                    f"models.{entry.id}",
                    f"lock pins revision {revision} but the registry pins {entry.source.revision}",
                    file=str(lock_path),
                )
            )
            merged.append(entry)
            continue
        try:
            files = {name: FileDigest.model_validate(d) for name, d in pinned.get("files", {}).items()}
        except ValidationError as exc:
            issues.append(
                Issue(f"models.{entry.id}.files", f"bad digest record: {exc.errors()[0]['msg']}", file=str(lock_path))
            )
            merged.append(entry)
            continue
        if entry.files and entry.files != files:
            issues.append(
                Issue(
                    f"models.{entry.id}.files",
                    "lock digests differ from the digests pinned in the registry",
                    file=str(lock_path),
                )
            )
        update: dict[str, Any] = {"files": files}
        if entry.source and not entry.source.revision:
            update["source"] = entry.source.model_copy(update={"revision": revision})
        merged.append(entry.model_copy(update=update))
    return merged, issues


_HEX40 = re.compile(r"^[0-9a-f]{40}$")


def is_commit(revision: str) -> bool:
    return bool(_HEX40.match(revision))
