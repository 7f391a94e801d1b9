"""Writing and reading the archive's tar file: plain members only, zstd optional.

Written: the manifest first, then the other members sorted, numeric owner 0, fixed modes and one
timestamp, so that the same folder gives the same bytes. Read: streamed member by member, the
manifest first, so that its declared sizes bound everything after it: a member is written out (by
this code, never ``extractall``) only when it is a plain file with a safe name that the manifest
lists, and never past its declared size; the whole stream is capped at what the manifest declares.
Everything else is reported by name and skipped, or stops the reading.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from finetune.archive.layout import MANIFEST, member_problem
from finetune.archive.manifest import MANIFEST_MAX_BYTES, read_manifest

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def wants_zstd(path: Path) -> bool:
    return path.name.endswith((".zst", ".zstd"))


def write_tar(folder: Path, top: str, out: Path, *, mtime: int, zstd: bool) -> None:
    """Pack ``folder`` as ``top/...`` into ``out``, its manifest first, atomically (a temporary file renamed last)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.part")
    try:
        with open(tmp, "wb") as raw:
            if zstd:
                import zstandard

                with zstandard.ZstdCompressor(level=10, threads=-1).stream_writer(raw, closefd=False) as fh:
                    _write_members(folder, top, fh, mtime)
            else:
                _write_members(folder, top, raw, mtime)
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _info(name: str, *, is_dir: bool, size: int, mtime: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE if is_dir else tarfile.REGTYPE
    info.mode = 0o755 if is_dir else 0o644
    info.size = 0 if is_dir else size
    info.mtime, info.uid, info.gid, info.uname, info.gname = mtime, 0, 0, "", ""
    return info


def _write_members(folder: Path, top: str, fh: IO[bytes], mtime: int) -> None:
    first = [folder / MANIFEST] if (folder / MANIFEST).is_file() else []
    with tarfile.open(fileobj=fh, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(_info(top, is_dir=True, size=0, mtime=mtime))
        for path in [*first, *(p for p in sorted(folder.rglob("*")) if p not in first)]:
            name = f"{top}/{path.relative_to(folder).as_posix()}"
            if path.is_symlink() or not (path.is_file() or path.is_dir()):
                raise ValueError(f"{path}: an archive holds plain files and folders only")
            if path.is_dir():
                tar.addfile(_info(name, is_dir=True, size=0, mtime=mtime))
            else:
                with open(path, "rb") as src:
                    tar.addfile(_info(name, is_dir=False, size=path.stat().st_size, mtime=mtime), src)


#: Largest extended header (pax, GNU long name) read: tarfile reads one whole into memory.
MAX_EXTENDED_HEADER = 64 * 1024
#: Bytes a tar stream holds beyond its files: headers, padding, end blocks, read-ahead.
_SLACK, _SLACK_PER_MEMBER = 256 * 1024, 8 * 1024
_CHUNK = 8 * 1024 * 1024


class Unreadable(Exception):
    """Reading stopped: the file is not a readable archive, or holds what it must not.

    Attributes:
        file: What the problem is about (the archive file, or a member).
        message: What is wrong.
    """

    def __init__(self, file: str, message: str) -> None:
        super().__init__(f"{file}: {message}")
        self.file, self.message = file, message


@dataclass
class Extracted:
    """What was written out, and what was refused."""

    top: str | None = None
    files: dict[str, tuple[int, str]] = field(default_factory=dict)  # name under top -> (size, sha256) written
    unlisted: list[str] = field(default_factory=list)  # names under top the manifest does not list: not written
    oversized: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (size, declared): not written
    problems: list[tuple[str, str]] = field(default_factory=list)  # (member name, problem): not written


class _OverBudget(Exception):
    pass


class _Budget:
    """A stream that refuses to give more than ``limit`` bytes in all (a decompression bomb stops here)."""

    def __init__(self, raw: Any, limit: int) -> None:
        self.raw, self.limit, self.used = raw, limit, 0

    def read(self, size: int = -1) -> bytes:
        allowed = self.limit - self.used + 1  # one more than allowed: reading it is the overrun
        data: bytes = self.raw.read(allowed if size < 0 else min(size, allowed))
        self.used += len(data)
        if self.used > self.limit:
            raise _OverBudget
        return data

    def close(self) -> None:
        pass  # the caller closes the stream it opened


#: Members tarfile reads whole into memory: pax headers and GNU long names.
_EXTENDED = (
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
)


class _BoundedInfo(tarfile.TarInfo):
    """Refuses an oversized extended header before tarfile reads it into memory."""

    def _proc_member(self, tarfile_: tarfile.TarFile) -> Any:
        if self.type in _EXTENDED and self.size > MAX_EXTENDED_HEADER:
            raise tarfile.HeaderError(f"an extended header of {self.size:,} bytes (at most {MAX_EXTENDED_HEADER:,})")
        return super()._proc_member(tarfile_)  # type: ignore[misc]


def _kind(member: tarfile.TarInfo) -> str | None:
    if member.issparse():
        return "a sparse file"
    if member.isreg() or member.isdir():
        return None
    if member.issym() or member.islnk():
        return f"a link (to '{_shown(member.linkname)}')"
    if member.ischr() or member.isblk():
        return "a device"
    if member.isfifo():
        return "a named pipe"
    return "not a plain file"


def _shown(name: str) -> str:
    """A member name short enough to print."""
    return name if len(name) <= 200 else f"{name[:150]}...{name[-40:]} ({len(name)} characters)"


class TarReader:
    """One pass over an archive's members: :meth:`first` (the manifest), then :meth:`extract`."""

    def __init__(
        self, tar: tarfile.TarFile, budget: _Budget, file: str, errors: tuple[type[Exception], ...], kind: str
    ):
        self._tar, self._budget, self._file, self._errors, self._kind = tar, budget, file, errors, kind
        self.top: str | None = None

    @contextmanager
    def _reading(self) -> Iterator[None]:
        """Reading errors as :class:`Unreadable`, naming the archive file."""
        try:
            yield
        except _OverBudget:
            limit = self._budget.limit
            raise Unreadable(
                self._file, f"holds more than its manifest declares (over {limit:,} bytes): not read on"
            ) from None
        except self._errors as exc:
            raise Unreadable(self._file, f"not a readable {self._kind} file: {type(exc).__name__}: {exc}") from None

    def _next(self) -> tarfile.TarInfo | None:
        with self._reading():
            return self._tar.next()

    def first(self, name: str, limit: int) -> tuple[str, bytes]:
        """The top folder's name and the content of ``<top>/name``, which must be the first file.

        Raises:
            Unreadable: It is not first, or larger than ``limit``, or the archive cannot be read.
        """
        member = self._next()
        if member is None:
            raise Unreadable(self._file, "an empty archive")
        problem = member_problem(member.name) or _kind(member)
        if problem is not None:
            raise Unreadable(_shown(member.name), f"refused: {problem}; nothing else was read")
        self.top = member.name.split("/")[0]
        if member.name == self.top and member.isdir():
            member = self._next()
        if member is None or member.name != f"{self.top}/{name}" or not member.isreg():
            found = "nothing" if member is None else f"'{_shown(member.name)}'"
            raise Unreadable(
                name, f"not the archive's first file ({found} is): not an archive as the engine builds one"
            )
        if member.size > limit:
            raise Unreadable(name, f"{member.size:,} bytes: more than it may hold ({limit:,}); nothing else was read")
        with self._reading():
            source = self._tar.extractfile(member)
            return self.top, source.read() if source is not None else b""

    def extract(self, dest: Path, sizes: Mapping[str, int], result: Extracted) -> None:
        """Write the rest of the members under ``dest``, as the module docstring says, into ``result``.

        Args:
            dest: The folder to write ``<top>/...`` into.
            sizes: The manifest's files and their declared sizes, by name under the top folder.
            result: Filled as the members are read (what was written and refused so far survives a stop).

        Raises:
            Unreadable: Reading stopped (the archive cannot be read further, holds more than
                declared, or a file cannot be written out).
        """
        assert self.top is not None, "first() reads the manifest before the rest"
        top = self.top
        seen = {top, f"{top}/{MANIFEST}"}
        result.top = top
        self._budget.limit = self._budget.used + sum(sizes.values()) + _SLACK + _SLACK_PER_MEMBER * len(sizes)
        most = 2 * len(sizes) + 64  # files and their folders; a flood of empty members is not read
        for _ in range(most):
            member = self._next()
            if member is None:
                return
            name, parts = member.name, member.name.split("/")
            problem = member_problem(name) or _kind(member)
            if problem is None and parts[0] != top:
                problem = f"outside the archive's top folder '{top}'"
            elif problem is None and name in seen:
                problem = "appears twice in the archive"
            elif problem is None and member.isreg() and len(parts) == 1:
                problem = "a file outside the archive's top folder"
            remaining = self._budget.limit - self._budget.used
            if member.isreg() and member.size > remaining:
                raise Unreadable(_shown(name), f"{member.size:,} bytes, more than the manifest declares: not read")
            if problem is not None:
                result.problems.append((_shown(name), problem))
                continue
            seen.add(name)
            rel = "/".join(parts[1:])
            if member.isdir():
                dest.joinpath(*parts).mkdir(parents=True, exist_ok=True)
            elif rel not in sizes:
                result.unlisted.append(rel)
            elif member.size > sizes[rel]:
                result.oversized[rel] = (member.size, sizes[rel])
            else:
                result.files[rel] = self._write(member, dest.joinpath(*parts))
        raise Unreadable(self._file, f"more than {most} members for the {len(sizes)} files its manifest lists")

    def _write(self, member: tarfile.TarInfo, target: Path) -> tuple[int, str]:
        digest, written = hashlib.sha256(), 0
        with self._reading():
            source = self._tar.extractfile(member)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "wb") as out:
                while written < member.size:
                    with self._reading():
                        chunk = source.read(min(_CHUNK, member.size - written)) if source is not None else b""
                    if not chunk:
                        break
                    out.write(chunk)
                    digest.update(chunk)
                    written += len(chunk)
        except OSError as exc:
            raise Unreadable(_shown(member.name), f"could not be written out: {exc.strerror or exc}") from None
        return written, digest.hexdigest()


@contextmanager
def open_tar(path: Path) -> Iterator[TarReader]:
    """A :class:`TarReader` over the tar (or zstd-compressed tar) file ``path``.

    Raises:
        Unreadable: The file is neither, or cannot be opened.
    """
    errors: tuple[type[Exception], ...] = (tarfile.TarError, EOFError, OSError)
    try:
        raw = open(path, "rb")
    except OSError as exc:
        raise Unreadable(path.name, f"cannot be read: {exc.strerror or exc}") from None
    with raw:
        try:
            zstd = raw.read(4) == ZSTD_MAGIC
            raw.seek(0)
        except OSError as exc:
            raise Unreadable(path.name, f"cannot be read: {exc.strerror or exc}") from None
        if not zstd:
            yield _reader(raw, path.name, errors, "tar")
            return
        import zstandard

        errors = (*errors, zstandard.ZstdError)
        with zstandard.ZstdDecompressor().stream_reader(raw) as stream:
            yield _reader(stream, path.name, errors, "zstd-compressed tar")


def _reader(stream: Any, file: str, errors: tuple[type[Exception], ...], kind: str) -> TarReader:
    budget = _Budget(stream, MANIFEST_MAX_BYTES + _SLACK)
    try:
        tar = tarfile.open(fileobj=budget, mode="r|", tarinfo=_BoundedInfo)  # type: ignore[call-overload]
    except errors as exc:
        raise Unreadable(file, f"not a readable {kind} file: {type(exc).__name__}: {exc}") from None
    return TarReader(tar, budget, file, errors, kind)


def safe_extract(path: Path, dest: Path) -> Extracted:
    """Write the archive's files, as its manifest declares them, under ``dest`` (no signature check).

    Raises:
        Unreadable: The file is not a readable archive, its manifest cannot be read, or reading stopped.
    """
    result = Extracted()
    with open_tar(path) as reader:
        top, data = reader.first(MANIFEST, MANIFEST_MAX_BYTES)
        read = read_manifest(data, None)
        files = read.raw.get("files") if read.raw is not None else None
        if not isinstance(files, dict):
            raise Unreadable(MANIFEST, "; ".join(read.problems) or "lists no files")
        sizes = {k: v["size"] for k, v in files.items() if isinstance(v, dict) and isinstance(v.get("size"), int)}
        reader.extract(dest, sizes, result)
    result.top = top
    return result
