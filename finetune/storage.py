"""Tenant buckets: one tenant's storage for one term, over fsspec (``file://`` or ``s3://``).

A :class:`Bucket` is rooted at ``<base>/<tenant>/<term>`` and every path it takes is relative
to that root. Paths that could leave it are refused before any I/O (``..``, absolute paths,
backslashes, schemes, control characters, and on ``file://`` links that resolve outside), and
every name that comes back from a listing is checked to lie under the root, so tenant ``t1`` never
sees ``t10``. Writes are checked against the term's quota first.

Writes are atomic: a single object is written under a temporary name and moved into place (an S3
PUT is atomic by itself). Folders are published with a signed manifest written last by
:mod:`finetune.published`. A :class:`BucketRef` names a bucket as plain data (no credentials), so a
job spec can carry it to workers on other nodes, which reach it with their own settings.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlparse
from urllib.request import url2pathname

import fsspec
from pydantic import BaseModel, ConfigDict

from finetune.errors import Fault, FinetuneError
from finetune.files import human_size
from finetune.paths import bucket_path_problem, normalise_bucket_path
from finetune.settings import Settings

ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
STAGING = ".staging"
DEFAULT_QUOTA_BYTES = 10**12  # about 1 TB per tenant and term (PLATFORM.md, P5)
_CHUNK = 8 * 1024 * 1024


class StorageError(FinetuneError):
    """A storage operation failed (transient: the store may be back in a moment) or was refused."""

    fault: Fault = "transient"


class PathEscapeError(StorageError):
    """A path would lead outside the tenant's bucket."""

    fault: Fault = "tenant"


class QuotaExceededError(StorageError):
    """A write would take the tenant past the term's storage quota."""

    fault: Fault = "tenant"


class BucketRef(BaseModel):
    """Where a bucket is, as plain data: a storage URL and the tenant and term, or a plain folder.

    Credentials are not part of it: whoever opens the bucket uses its own settings.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str
    tenant: str | None = None
    term: str | None = None
    endpoint_url: str | None = None
    region: str | None = None


@dataclass(frozen=True)
class StorageConfig:
    """Where buckets live and how to reach them."""

    url: str
    quota_bytes: int = DEFAULT_QUOTA_BYTES
    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> StorageConfig:
        secret = settings.s3_secret_access_key
        return cls(
            url=settings.storage_url or (settings.data_dir / "buckets").resolve().as_uri(),
            quota_bytes=settings.quota_bytes,
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
            access_key_id=settings.s3_access_key_id,
            secret_access_key=secret.get_secret_value() if secret else None,
        )

    @property
    def protocol(self) -> str:
        return self.url.split("://", 1)[0] if "://" in self.url else "file"

    def filesystem(self) -> fsspec.AbstractFileSystem:
        if self.protocol == "file":
            return fsspec.filesystem("file")
        if self.protocol == "s3":
            client: dict[str, Any] = {"region_name": self.region} if self.region else {}
            return fsspec.filesystem(
                "s3",
                key=self.access_key_id,
                secret=self.secret_access_key,
                endpoint_url=self.endpoint_url,
                client_kwargs=client,
                use_listings_cache=False,
            )
        raise StorageError(f"unsupported storage url '{self.url}': use file:// or s3://")

    def base_path(self) -> str:
        if self.url.startswith("file://"):  # a file URL percent-encodes spaces and non-ASCII names
            return url2pathname(urlparse(self.url).path).rstrip("/")
        rest = self.url.split("://", 1)[1] if "://" in self.url else self.url
        return rest.rstrip("/")


class Bucket:
    """One tenant's storage for one term. All paths are relative to its root."""

    def __init__(self, config: StorageConfig, tenant: str, term: str, fs: fsspec.AbstractFileSystem | None = None):
        for what, value in (("tenant", tenant), ("term", term)):
            if not ID_PATTERN.match(value):
                raise StorageError(f"invalid {what} id '{value}': lower-case letters, digits and '-' only")
        self.config = config
        self.tenant, self.term = tenant, term
        self.fs = fs or config.filesystem()
        self.local = config.protocol == "file"
        self.root = f"{config.base_path()}/{tenant}/{term}"
        self._folder = False  # a plain folder (Bucket.folder), not a tenant's bucket

    @classmethod
    def for_tenant(cls, settings: Settings, tenant: str, term: str) -> Bucket:
        return cls(StorageConfig.from_settings(settings), tenant, term)

    @classmethod
    def folder(cls, path: Path, quota_bytes: int = DEFAULT_QUOTA_BYTES) -> Bucket:
        """A plain local folder used as a bucket: the CLI's ``--bucket`` and job folders of local runs."""
        resolved = Path(path).resolve()
        bucket = cls(StorageConfig(url=resolved.parent.as_uri(), quota_bytes=quota_bytes), "local", "local")
        bucket.root = resolved.as_posix()
        bucket._folder = True
        return bucket

    def ref(self) -> BucketRef:
        """This bucket as plain data, for a job spec."""
        if self._folder:
            return BucketRef(url=Path(self.root).as_uri())
        cfg = self.config
        return BucketRef(
            url=cfg.url, tenant=self.tenant, term=self.term, endpoint_url=cfg.endpoint_url, region=cfg.region
        )

    @classmethod
    def from_ref(cls, ref: BucketRef, settings: Settings) -> Bucket:
        """Open the bucket ``ref`` names, with the credentials and quota of ``settings``."""
        if ref.tenant is None or ref.term is None:
            if not ref.url.startswith("file://"):
                raise StorageError(f"a bucket without tenant and term must be a local folder, not '{ref.url}'")
            return cls.folder(Path(url2pathname(urlparse(ref.url).path)), quota_bytes=settings.quota_bytes)
        secret = settings.s3_secret_access_key
        config = StorageConfig(
            url=ref.url,
            quota_bytes=settings.quota_bytes,
            endpoint_url=ref.endpoint_url,
            region=ref.region,
            access_key_id=settings.s3_access_key_id,
            secret_access_key=secret.get_secret_value() if secret else None,
        )
        return cls(config, ref.tenant, ref.term)

    def __repr__(self) -> str:
        return f"Bucket({self.config.protocol}://{self.root})"

    # ------------------------------------------------------------------------------- paths
    def full(self, rel: str) -> str:
        """The backend path of ``rel``, after refusing anything that could leave the bucket."""
        problem = bucket_path_problem(rel)
        if problem:
            raise PathEscapeError(f"'{rel}': {problem}")
        full = f"{self.root}/{normalise_bucket_path(rel)}"
        if self.local:
            root_real = os.path.realpath(self.root)
            real = os.path.realpath(full)
            if real != root_real and not real.startswith(root_real + os.sep):
                raise PathEscapeError(f"'{rel}': leads outside your bucket through a link")
        return full

    def relative(self, full: str) -> str:
        """The bucket-relative name of a backend path; refuses names outside the root."""
        full = full.rstrip("/")
        if self.local:
            full = Path(full).as_posix()
        prefix = self.root + "/"
        if not full.startswith(prefix):
            raise PathEscapeError(f"'{full}' is outside the bucket")
        return full[len(prefix) :]

    def local_path(self, rel: str) -> Path:
        """A local filesystem path for ``rel`` (``file://`` buckets only)."""
        if not self.local:
            raise StorageError("this bucket is not on the local filesystem")
        return Path(self.full(rel))

    # ------------------------------------------------------------------------------- reading
    def exists(self, rel: str) -> bool:
        return bool(self.fs.exists(self.full(rel)))

    def isdir(self, rel: str) -> bool:
        return bool(self.fs.isdir(self.full(rel)))

    def size(self, rel: str) -> int:
        return int(self.fs.info(self.full(rel))["size"])

    def open(self, rel: str, mode: str = "rb") -> IO[Any]:
        """Open for reading. Writing goes through :meth:`write_bytes` or :meth:`upload`."""
        if "r" not in mode or "+" in mode:
            raise StorageError("open() is read-only; write with write_bytes() or upload()")
        return self.fs.open(self.full(rel), mode)

    def read_bytes(self, rel: str) -> bytes:
        return bytes(self.fs.cat_file(self.full(rel)))

    def list(self, rel: str = "", recursive: bool = False) -> list[str]:
        """Names under ``rel`` (files only when recursive), relative to the bucket, sorted."""
        base = self.full(rel) if rel else self.root
        if not self.fs.exists(base):
            return []
        if recursive:
            found = self.fs.find(base + "/", withdirs=False)
        else:
            found = self.fs.ls(base + "/", detail=False)
        names = [self.relative(str(f)) for f in found]
        return sorted(n for n in names if n and not n.startswith(STAGING + "/") and n != STAGING)

    def walk_files(self, rel: str = "") -> Iterator[tuple[str, int]]:
        """(relative name, size) of every file under ``rel``."""
        base = self.full(rel) if rel else self.root
        if not self.fs.exists(base):
            return
        for full, info in sorted(self.fs.find(base + "/", withdirs=False, detail=True).items()):
            name = self.relative(str(full))
            if not name.startswith(STAGING + "/"):
                yield name, int(info.get("size") or 0)

    def usage(self) -> int:
        """Bytes stored in this bucket (staging included: it counts against the quota too)."""
        if not self.fs.exists(self.root):
            return 0
        return sum(int(i.get("size") or 0) for i in self.fs.find(self.root + "/", detail=True).values())

    # ------------------------------------------------------------------------------- writing
    def check_quota(self, extra: int) -> None:
        used = self.usage()
        if used + extra > self.config.quota_bytes:
            raise QuotaExceededError(
                f"writing {human_size(extra)} would exceed the storage quota of {human_size(self.config.quota_bytes)} "
                f"for {self.tenant}/{self.term} ({human_size(used)} used); delete old checkpoints or files first"
            )

    def _staging(self) -> str:
        return f"{self.root}/{STAGING}/{uuid.uuid4().hex}"

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write one object atomically: readers see the old content or the new, never a part."""
        target = self.full(rel)
        self.check_quota(len(data))
        if not self.local:
            self.fs.pipe_file(target, data)
            return
        tmp = self._staging()
        self.fs.makedirs(os.path.dirname(tmp), exist_ok=True)
        self.fs.pipe_file(tmp, data)
        self.fs.makedirs(os.path.dirname(target), exist_ok=True)
        os.replace(tmp, target)

    def upload(self, local: Path, rel: str, *, move: bool = False, check_quota: bool = True) -> None:
        """Copy one local file into the bucket, atomically.

        Args:
            local: The file.
            rel: Its name in the bucket.
            move: The local file is not needed afterwards: on a local bucket on the same
                filesystem it is renamed into place instead of copied; elsewhere it is deleted
                once uploaded.
            check_quota: Check the quota for this file (callers publishing many files check once).
        """
        target = self.full(rel)
        if check_quota:
            self.check_quota(local.stat().st_size)
        if not self.local:
            self.fs.put_file(str(local), target)
            if move:
                local.unlink()
            return
        self.fs.makedirs(os.path.dirname(target), exist_ok=True)
        if move:
            try:
                os.replace(local, target)
                return
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
        tmp = self._staging()
        self.fs.makedirs(os.path.dirname(tmp), exist_ok=True)
        self.fs.put_file(str(local), tmp)
        os.replace(tmp, target)
        if move:
            local.unlink()

    def download(self, rel: str, local: Path, *, max_bytes: int | None = None) -> str:
        """Copy one object to a local file; returns its sha256 (taken while copying).

        Raises:
            StorageError: The object holds more than ``max_bytes`` (nothing more than that is
                written to disk).
        """
        local.parent.mkdir(parents=True, exist_ok=True)
        digest, written = hashlib.sha256(), 0
        with self.fs.open(self.full(rel), "rb") as src, open(local, "wb") as dst:
            while chunk := src.read(_CHUNK):
                written += len(chunk)
                if max_bytes is not None and written > max_bytes:
                    raise StorageError(f"'{rel}' holds more than the {max_bytes:,} bytes expected")
                digest.update(chunk)
                dst.write(chunk)
        return digest.hexdigest()

    def remove(self, rel: str, recursive: bool = False) -> None:
        target = self.full(rel)
        if self.fs.exists(target):
            self.fs.rm(target, recursive=recursive)
