"""What reading one dataset file may cost, and the bounded reads that keep to it.

Datasets come from tenants' buckets and are hostile input: a file may be a link to someone else's
data, a pipe that never ends, a row of gigabytes or a small archive that inflates to terabytes.
Each breach becomes a located problem in the readers, never a crash, a hang or a full memory.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from dataclasses import dataclass, fields
from itertools import accumulate
from pathlib import Path
from typing import IO, Any, BinaryIO, NamedTuple, Protocol

from finetune.errors import Fault, FinetuneError

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB


@dataclass(frozen=True)
class DataLimits:
    """Bounds on reading a dataset file; every one is checked while reading, before memory is spent."""

    #: Bytes of one record (a JSON Lines line, a CSV record, a JSON array element). A 32k-token
    #: sample is about 128 KiB of text; 8 MiB leaves room for long-context rows and stops a runaway one.
    row_bytes: int = 8 * MiB
    #: Bytes one compressed file (``.jsonl.gz``) may inflate to. Far above any sane training file,
    #: well below the disk and time a bomb would cost.
    inflated_bytes: int = 16 * GiB
    #: Inflated over compressed size above which a compressed file is taken for a bomb. Text
    #: compresses 3 to 10 times, very repetitive data some tens of times; zeros about 1000 times.
    inflation_ratio: int = 200
    #: The ratio is only checked past this many inflated bytes, so small, very regular files pass.
    ratio_after_bytes: int = 64 * MiB
    #: Nesting of arrays and objects in one record: chat rows need 3 or 4 levels. Deeper nesting
    #: would exhaust the parser's recursion.
    json_depth: int = 64
    #: Size of a ``.json`` file, which is decoded whole (JSON Lines is streamed).
    json_file_bytes: int = 256 * MiB

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"DataLimits.{item.name} must be a positive integer, got {value!r}")


DEFAULT_DATA_LIMITS = DataLimits()


def size_text(n: int) -> str:
    """``8 MiB``, ``1.5 GiB``, ``900 bytes``: a size the way a tenant reads it."""
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= scale:
            return f"{n // scale} {unit}" if n % scale == 0 else f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def row_too_long(size: int, limits: DataLimits) -> str:
    return f"the row holds {size:,} bytes, more than the {size_text(limits.row_bytes)} allowed per row"


class FileRefused(FinetuneError):
    """A dataset file is not read (further): not a regular file, or over a limit. Readers turn it into a problem."""

    fault: Fault = "tenant"

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# ------------------------------------------------------------------------------------ regular files only

_REGULAR_ONLY = "datasets are read as regular files only"


def not_regular_reason(mode: int) -> str:
    """Why a file of this ``st_mode`` is refused: ``a symbolic link; datasets are read as regular files only``."""
    if stat.S_ISLNK(mode):
        kind = "a symbolic link"
    elif stat.S_ISFIFO(mode):
        kind = "a named pipe (FIFO)"
    elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        kind = "a device"
    elif stat.S_ISSOCK(mode):
        kind = "a socket"
    elif stat.S_ISDIR(mode):
        kind = "a folder"
    else:
        kind = "not a regular file"
    return f"{kind}; {_REGULAR_ONLY}"


def open_regular(path: Path) -> BinaryIO:
    """Open a regular file for reading, never following a link or blocking on a pipe.

    The path is checked with ``lstat`` (special files are never opened), opened with
    ``O_NOFOLLOW | O_NONBLOCK``, and the open file checked again with ``fstat``, so a file swapped
    for a link or a pipe in between is refused too.

    Raises:
        FileRefused: The path is a link, a pipe, a device, a socket or a folder, or cannot be opened.
    """
    try:
        mode = os.lstat(path).st_mode
    except OSError as exc:
        raise FileRefused(f"cannot be read: {exc.strerror}") from None
    if not stat.S_ISREG(mode):
        raise FileRefused(not_regular_reason(mode))
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # became a link after the lstat
            raise FileRefused(not_regular_reason(stat.S_IFLNK)) from None
        raise FileRefused(f"cannot be opened: {exc.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise FileRefused(not_regular_reason(mode))
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


# ------------------------------------------------------------------------------------ bounded lines

#: Piece read at a time while passing over a line that is too long to keep.
_SKIP_PIECE = 1 * MiB


class LongLine(NamedTuple):
    """A line longer than ``row_bytes``: read through, not kept. ``size`` excludes the line end."""

    size: int


class _Readable(Protocol):
    def readline(self, size: int = -1, /) -> bytes: ...


class LineReader:
    """Physical lines of a binary stream, none held in memory beyond ``limits.row_bytes``.

    When ``compressed`` is given (the file under a decompressing ``stream``), inflated bytes are
    counted as they come, and :class:`FileRefused` is raised once they pass
    ``limits.inflated_bytes`` or ``limits.inflation_ratio`` times the compressed bytes read.
    """

    def __init__(self, stream: _Readable, limits: DataLimits, compressed: IO[bytes] | None = None) -> None:
        self._stream, self._limits, self._compressed = stream, limits, compressed
        self.inflated = 0
        self._next_ratio_check = limits.ratio_after_bytes

    def readline(self) -> bytes | LongLine:
        """The next line with its line end; ``b""`` at the end; a :class:`LongLine` when too long to keep."""
        line = self._read(self._limits.row_bytes + 1)
        if len(line) <= self._limits.row_bytes or line.endswith(b"\n"):
            return line
        size = len(line)
        while line and not line.endswith(b"\n"):
            line = self._read(_SKIP_PIECE)
            size += len(line)
        return LongLine(size - 1 if line.endswith(b"\n") else size)

    def _read(self, size: int) -> bytes:
        piece = self._stream.readline(size)
        if self._compressed is not None:
            self.inflated += len(piece)
            self._check_inflation(self._compressed)
        return piece

    def _check_inflation(self, compressed: IO[bytes]) -> None:
        if self.inflated > self._limits.inflated_bytes or self.inflated >= self._next_ratio_check:
            self._next_ratio_check = self.inflated + MiB  # tell() costs a system call: not on every line
            problem = inflation_problem(self.inflated, compressed.tell(), self._limits)
            if problem:
                raise FileRefused(problem)


def inflation_problem(inflated: int, compressed: int, limits: DataLimits) -> str | None:
    """Why ``compressed`` bytes inflating to ``inflated`` bytes so far are refused, or None."""
    if inflated > limits.inflated_bytes:
        return f"inflates to more than {size_text(limits.inflated_bytes)}, the most a compressed file may hold"
    if inflated > limits.ratio_after_bytes and inflated > limits.inflation_ratio * max(compressed, 1):
        return f"inflates more than {limits.inflation_ratio} times over, as a decompression bomb does"
    return None


# ------------------------------------------------------------------------------------ record checks

_DEPTH_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_JSON_TOKEN = re.compile(r'"[^"]*"?|[\[\]{}]')  # after _neutral: no escaped quote is left in a string


def _neutral(text: str) -> str:
    """``text`` with every escaped backslash and quote blanked (same length), so strings end at the next quote.

    Pairing backslashes left to right is how JSON reads escapes; outside strings a backslash is
    invalid JSON, where the parser stops anyway.
    """
    return text.replace("\\\\", "  ").replace('\\"', "  ")


def too_deep(text: str, limit: int, *, top: int = 0) -> int | None:
    """Where JSON ``text`` nests arrays and objects deeper than ``limit``, before any parser recurses.

    Brackets inside strings do not count. Cheap for ordinary rows: text with no more than
    ``limit`` opening brackets cannot be too deep, and is not scanned.

    Args:
        text: JSON text (valid or not).
        limit: The deepest nesting allowed (``{}`` is 1 deep).
        top: Levels that hold the records (1 for a JSON array file).

    Returns:
        None when nothing is too deep; else where the value that nests too deep starts: the
        top-level value when ``top`` is 0, the array's element when it is 1.
    """
    if text.count("[") + text.count("{") <= limit:
        return None
    plain = _neutral(text) if "\\" in text else text
    brackets = _NOT_BRACKET.sub("", "".join(plain.split('"')[::2]))  # every other piece is inside a string
    if max(accumulate(map(_DEPTH_STEP.__getitem__, brackets)), default=0) <= limit:
        return None
    depth, start = 0, 0
    for match in _JSON_TOKEN.finditer(plain):
        step = _DEPTH_STEP.get(plain[match.start()], 0)
        depth += step
        if step > 0 and depth == top + 1:
            start = match.start()
        if depth > limit:
            return start
    return None  # not reached: the bracket count above found the same depth


def deep_reason(limits: DataLimits) -> str:
    return f"nested deeper than {limits.json_depth} levels of arrays and objects"


#: A JSON escape of a surrogate code point: only these can put a lone surrogate into a decoded string.
SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def surrogate_reason(char: str) -> str:
    """``contains an unpaired surrogate \\ud800: not valid Unicode``."""
    return f"contains an unpaired surrogate \\u{ord(char):04x}: not valid Unicode"


def unpaired_surrogate(text: str) -> str | None:
    """The first lone surrogate in ``text`` (a decoded JSON string keeps only the unpaired ones)."""
    found = _SURROGATE.search(text)
    return found.group() if found else None


def find_surrogate(value: Any) -> tuple[str, str] | None:
    """The first string of a decoded JSON value (keys included) holding a lone surrogate.

    Returns:
        ``(path, surrogate)``, the path like ``messages[1].content`` (of the object, for a key);
        None when every string is valid Unicode.
    """
    pending: list[tuple[str, Any]] = [("", value)]
    while pending:
        path, item = pending.pop()
        if isinstance(item, str):
            char = unpaired_surrogate(item)
            if char:
                return path, char
        elif isinstance(item, dict):
            children = []
            for key, child in item.items():
                char = unpaired_surrogate(key)
                if char:
                    return path, char
                name = key if len(key) <= 40 else f"{key[:37]}..."  # a path, not a copy of the data
                children.append((f"{path}.{name}" if path else name, child))
            pending.extend(reversed(children))
        elif isinstance(item, list):
            pending.extend(reversed([(f"{path}[{i}]", child) for i, child in enumerate(item)]))
    return None


__all__ = ["DEFAULT_DATA_LIMITS", "DataLimits", "FileRefused", "LineReader", "LongLine", "open_regular"]
