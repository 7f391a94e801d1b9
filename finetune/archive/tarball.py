"""Writing and reading the archive's tar file: plain members only, zstd optional.

Written: sorted members, numeric owner 0, fixed modes and one timestamp, so that the same folder
gives the same bytes. Read: streamed member by member; only plain files and folders with safe,
relative names under one top folder are written out, by this code (never ``extractall``), and
everything else is reported by name and skipped.
"""

from __future__ import annotations

import os
import shutil
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from finetune.archive.layout import member_problem

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def wants_zstd(path: Path) -> bool:
    return path.name.endswith((".zst", ".zstd"))


def write_tar(folder: Path, top: str, out: Path, *, mtime: int, zstd: bool) -> None:
    """Pack ``folder`` as ``top/...`` into ``out``, atomically (a temporary file renamed last)."""
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
    with tarfile.open(fileobj=fh, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(_info(top, is_dir=True, size=0, mtime=mtime))
        for path in sorted(folder.rglob("*")):
            name = f"{top}/{path.relative_to(folder).as_posix()}"
            if path.is_symlink() or not (path.is_file() or path.is_dir()):
                raise ValueError(f"{path}: an archive holds plain files and folders only")
            if path.is_dir():
                tar.addfile(_info(name, is_dir=True, size=0, mtime=mtime))
            else:
                with open(path, "rb") as src:
                    tar.addfile(_info(name, is_dir=False, size=path.stat().st_size, mtime=mtime), src)


@dataclass
class Extracted:
    """What :func:`safe_extract` wrote and what it refused."""

    top: str | None = None
    files: list[str] = field(default_factory=list)  # relative to the top folder
    problems: list[tuple[str, str]] = field(default_factory=list)  # (member name, problem)


@contextmanager
def _open_stream(path: Path) -> Iterator[tarfile.TarFile]:
    with open(path, "rb") as raw:
        head = raw.read(4)
        raw.seek(0)
        if head == ZSTD_MAGIC:
            import zstandard

            with zstandard.ZstdDecompressor().stream_reader(raw) as reader:
                with tarfile.open(fileobj=reader, mode="r|") as tar:
                    yield tar
        else:
            with tarfile.open(fileobj=raw, mode="r|*") as tar:
                yield tar


def _kind(member: tarfile.TarInfo) -> str | None:
    if member.isreg() or member.isdir():
        return None
    if member.issym() or member.islnk():
        return f"a link (to '{member.linkname}')"
    if member.ischr() or member.isblk():
        return "a device"
    if member.isfifo():
        return "a named pipe"
    return "not a plain file"


def safe_extract(path: Path, dest: Path) -> Extracted:
    """Write the archive's plain files under ``dest``; report every member that is not plain.

    Raises:
        tarfile.TarError, OSError: the file is not a readable tar (or zstd tar) file.
    """
    result = Extracted()
    seen: set[str] = set()
    with _open_stream(path) as tar:
        for member in tar:
            name = member.name
            problem = member_problem(name) or _kind(member)
            parts = name.rstrip("/").split("/")
            if problem is None:
                if result.top is None:
                    result.top = parts[0]
                if parts[0] != result.top:
                    problem = f"outside the archive's top folder '{result.top}'"
                elif name.rstrip("/") in seen:
                    problem = "appears twice in the archive"
            if problem is not None:
                result.problems.append((name, problem))
                continue
            seen.add(name.rstrip("/"))
            target = dest.joinpath(*parts)
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            if len(parts) == 1:
                result.problems.append((name, "a file outside the archive's top folder"))
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            source = tar.extractfile(member)
            if source is None:
                result.problems.append((name, "cannot be read"))
                continue
            with source, open(target, "wb") as out:
                shutil.copyfileobj(source, out, 8 * 1024 * 1024)
            result.files.append("/".join(parts[1:]))
    return result
