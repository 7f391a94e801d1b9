"""Origin reviews of custom (uploaded) models: an operator's decision on exactly one set of files.

A model that is not in the registry trains only after a person has reviewed its origin (P8: there
is no fixed denylist, unclear cases are reviewed one by one). The tenant's recipe only *declares*
a developer; what makes the model trainable is a review record that approves its files. A record
names every file it covers (name, size, sha256, as :func:`finetune.modelstore.scan_folder` hashes
them) and is stored as ``<data_dir>/reviews/<digest>.json``, where ``<digest>`` is the sha256 of
that list: changing, adding or removing any file makes the review not apply.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from collections.abc import Mapping
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from finetune.errors import Fault, ModelStoreError
from finetune.files import write_json_atomic
from finetune.modelstore import CheckReport, check_folder
from finetune.origin import Decision, normalise_entity
from finetune.registry import CountryCode, FileDigest, Registry, Sha256

#: A review record lists every file of a model; even a sharded 400B model stays far below this.
MAX_RECORD_BYTES = 16 * 1024 * 1024

Text = Annotated[str, Field(min_length=1, max_length=2000)]


class ReviewStatus(StrEnum):
    PENDING = "pending"
    APPROVED = "approved"
    DENIED = "denied"


class ReviewError(ModelStoreError):
    """A custom model has no approved review for exactly its files (or was denied)."""

    fault: Fault = "tenant"


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Decided(_Record):
    """One decision: who, when, what, and why."""

    status: ReviewStatus
    reviewer: Text
    reason: Text
    time: str = Field(pattern=r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


_DECIDED = {"status", "reviewer", "reason", "time"}


class ReviewRecord(Decided):
    """The latest decision on one set of files, with the decisions it replaced.

    Attributes:
        digest: :func:`files_digest` of ``files``; also the record's file name.
        developer: The developer entity the reviewer found (or confirmed) for these weights.
        country: That developer's country (ISO 3166-1 alpha-2).
        folder: Where the files were reviewed, for the record only (the digest is what counts).
        files: Every file the review covers.
        history: Earlier decisions on the same files, oldest first.
    """

    digest: Sha256
    developer: Text
    country: CountryCode
    folder: str
    files: dict[str, FileDigest]
    history: tuple[Decided, ...] = ()


def reviews_dir(data_dir: Path) -> Path:
    """The review store under an engine data folder."""
    return data_dir / "reviews"


def files_digest(files: Mapping[str, FileDigest]) -> str:
    """The sha256 of a file list (names, sizes and sha256, in name order): the key of its review."""
    listing = {name: {"sha256": d.sha256, "size": d.size} for name, d in sorted(files.items())}
    return hashlib.sha256(json.dumps(listing, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def find_review(reviews: Path, files: Mapping[str, FileDigest]) -> ReviewRecord | None:
    """The review record of exactly these files, or None when there is none.

    Raises:
        ModelStoreError: a record exists but is unreadable or names other files (a damaged or
            edited record never counts as an approval).
    """
    digest = files_digest(files)
    path = reviews / f"{digest}.json"
    if not path.is_file():
        return None
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_RECORD_BYTES + 1)
        if len(raw) > MAX_RECORD_BYTES:
            raise ValueError(f"larger than {MAX_RECORD_BYTES} bytes")
        record = ReviewRecord.model_validate_json(raw)
    except (OSError, ValueError, ValidationError) as exc:
        raise ModelStoreError(f"review record {path} is damaged: {str(exc)[:300]}") from None
    if record.digest != digest or record.files != dict(files):
        raise ModelStoreError(f"review record {path} does not list the files it is filed under")
    return record


def record_review(
    reviews: Path,
    report: CheckReport,
    *,
    status: ReviewStatus,
    reviewer: str,
    reason: str,
    now: datetime | None = None,
) -> ReviewRecord:
    """Record an operator's decision on the files of a checked folder (``finetune models review``).

    Args:
        reviews: The review store (:func:`reviews_dir`).
        report: :func:`finetune.modelstore.check_folder` of the folder, made with the developer
            and country the reviewer established.
        status: The decision.
        reviewer: Who decided (an operator's name or account).
        reason: Why, in words a tenant can be shown.
        now: The time of the decision (default: now).

    Returns:
        The record written to ``<reviews>/<digest>.json``; a former decision moves to its history.

    Raises:
        ModelStoreError: approving files the origin policy denies (a denied developer or country,
            weights identical to a denied model), an empty reviewer or reason, or a damaged record.
    """
    if status is ReviewStatus.APPROVED and report.verdict.decision is Decision.DENY:
        raise ModelStoreError(
            f"{report.folder} cannot be approved: the origin policy denies it: " + "; ".join(report.verdict.reasons)
        )
    previous = find_review(reviews, report.files)
    history = () if previous is None else (*previous.history, Decided(**previous.model_dump(include=_DECIDED)))
    stamp = (now or datetime.now(UTC)).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    try:
        record = ReviewRecord(
            status=status,
            reviewer=reviewer.strip(),
            reason=reason.strip(),
            time=stamp,
            digest=files_digest(report.files),
            developer=report.developer,
            country=report.country,
            folder=report.folder,
            files=dict(report.files),
            history=history,
        )
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ModelStoreError(f"review not recorded: {problems}") from None
    write_json_atomic(reviews / f"{record.digest}.json", record.model_dump(mode="json"))
    return record


def review_command(folder: Path, developer: str, country: str) -> str:
    """The operator command that records a review of ``folder``."""
    return (
        f"finetune models review {shlex.quote(str(folder))} --developer {shlex.quote(developer)} "
        f"--country {shlex.quote(country)} --approve --reason '...'"
    )


def require_approval(
    folder: Path, developer: str, country: str, registry: Registry, reviews: Path, *, shown_as: str | None = None
) -> CheckReport:
    """Check a tenant's model folder as ``finetune models check`` does, then require an approved
    review of exactly its files, for the declared developer and country.

    Args:
        shown_as: How messages name the folder (its path in the tenant's bucket).

    Raises:
        ModelCheckError: the folder holds pickle weights, custom code, a link, a special file or a
            bad safetensors header, or is not a model folder.
        ReviewError: the origin policy denies the declared developer or the weights; no review,
            a pending or denied one; or a review that found another developer or country.
    """
    name = shown_as or str(folder)
    report = check_folder(folder, developer, country, registry, cache_links=False)
    if report.verdict.decision is Decision.DENY:
        raise ReviewError(f"'{name}' is not allowed on this platform: " + "; ".join(report.verdict.reasons))
    record = find_review(reviews, report.files)
    digest = files_digest(report.files)
    if record is None or record.status is ReviewStatus.PENDING:
        raise ReviewError(
            f"custom model '{name}' awaits origin review of its files (digest {digest[:16]}): "
            f"an operator records one with `{review_command(folder, developer, report.country)}`"
        )
    if record.status is ReviewStatus.DENIED:
        raise ReviewError(f"custom model '{name}' was denied on review ({record.time}): {record.reason}")
    if normalise_entity(record.developer) != normalise_entity(developer) or record.country != report.country:
        raise ReviewError(
            f"custom model '{name}' was approved as developed by {record.developer} ({record.country}), "
            f"but the recipe declares {developer} ({report.country}): correct the recipe or ask for a new review"
        )
    return report
