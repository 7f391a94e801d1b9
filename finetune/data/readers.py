"""Read dataset files into located rows: JSONL (optionally gzipped), JSON arrays, CSV and Parquet.

Every record becomes a :class:`Row` or a :class:`RowProblem` that says where it is and what is
wrong; a bad record never stops the file and is never dropped silently. Only blank JSONL and CSV
lines are ignored: they are not records.

Files are hostile input (see :mod:`finetune.data.limits`): only regular files are read, never
through a link; rows, nesting and inflation are bounded, and each breach is a located problem.
Memory stays bounded: JSONL and CSV are streamed line by line and Parquet by record batches. A
JSON array file is the exception: it is decoded whole (the format has no cheap way to stream it),
so it has a size limit, and large datasets should use JSONL or Parquet.

Text must be UTF-8, with or without a byte-order mark, with LF or CRLF line ends.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import logging
import os
import re
import stat
import sys
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from finetune.data.limits import (
    DEFAULT_DATA_LIMITS,
    SURROGATE_ESCAPE,
    DataLimits,
    FileRefused,
    LineReader,
    LongLine,
    deep_reason,
    find_surrogate,
    inflation_problem,
    not_regular_reason,
    open_regular,
    row_too_long,
    size_text,
    surrogate_reason,
    too_deep,
)
from finetune.data.types import Row, RowProblem
from finetune.errors import FinetuneError

logger = logging.getLogger(__name__)

#: File name endings read by :func:`read_rows`, compared case-insensitively.
SUPPORTED_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".csv", ".parquet")

_BOM = b"\xef\xbb\xbf"
_NEWLINE = b"\n"
_WHITESPACE = re.compile(r"[ \t\n\r]*")
_UNREADABLE = "the rest of the file cannot be read"
#: Parquet rows decoded at a time.
_PARQUET_BATCH_ROWS = 1024


class DataReadError(FinetuneError):
    """The dataset path cannot be read at all: missing, or not a supported kind of file."""


def describe_type(value: Any) -> str:
    """Name a value's type the way a tenant sees it in JSON: ``a string``, ``a list``, ``null``..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return f"a {type(value).__name__}"


def json_error_reason(exc: json.JSONDecodeError, *, with_line: bool = True) -> str:
    """``invalid JSON: Expecting ',' delimiter (column 17)``.

    Args:
        exc: The error from :mod:`json`.
        with_line: Also name the line when it is not the first (for a multi-line value); leave it
            out when the problem's ``where`` already holds the line.
    """
    place = f"line {exc.lineno}, column {exc.colno}" if with_line and exc.lineno > 1 else f"column {exc.colno}"
    return f"invalid JSON: {exc.msg} ({place})"


def read_rows(
    path: Path, display_name: str | None = None, *, limits: DataLimits = DEFAULT_DATA_LIMITS
) -> Iterator[Row | RowProblem]:
    """Read a data file, or every data file in a folder, as located rows and problems.

    Args:
        path: A ``.jsonl``, ``.jsonl.gz``, ``.json``, ``.csv`` or ``.parquet`` file, or a folder
            holding such files (read recursively, sorted by their relative path). Files and folders
            whose name starts with ``.`` or ``_`` (``.DS_Store``, ``_SUCCESS``) are skipped.
        display_name: The name used in ``where`` (usually the path inside the tenant's bucket);
            defaults to the file or folder name. A folder's files are named ``<display_name>/<relative path>``.
        limits: Bounds on rows, nesting and inflation; each breach is a located problem.

    Returns:
        An iterator of rows and problems in file order. ``where`` is ``"<name>:<line>"`` (1-based
        physical line where the record starts) or ``"<name>:row <n>"`` for Parquet; a problem with
        a whole file (a link, a pipe, a device, an unreadable or oversized file) is located at
        ``"<name>"`` and the file is never opened. An empty file (or folder) gives nothing: the
        caller reports that there are no rows.

    Raises:
        DataReadError: When ``path`` does not exist, is not a supported file type, or is a folder
            holding a file of an unsupported type. Raised at call time, before any row is read.
    """
    name = path.name if display_name is None else display_name.rstrip("/")
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        raise DataReadError(f"{name}: not found") from None
    except OSError as exc:
        raise DataReadError(f"{name}: cannot be read: {exc.strerror}") from None
    if stat.S_ISDIR(mode):
        entries = _walk(path, name)
        for entry in entries:
            if entry.refusal is None:
                _check_suffix(entry.path, entry.name)
    else:
        if stat.S_ISREG(mode):
            _check_suffix(path, name)
        entries = [_Entry(path, name, None if stat.S_ISREG(mode) else not_regular_reason(mode))]
    return (item for entry in entries for item in _read_entry(entry, limits))


def dataset_files(path: Path) -> list[tuple[str, Path]]:
    """The regular files :func:`read_rows` reads at ``path``, as ``(relative name, path)``, sorted.

    Links, pipes, devices and sockets are left out (read_rows refuses them), and nothing is
    opened: safe to hash the files listed. A file ``path`` is named by its own name.
    """
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return []
    if stat.S_ISREG(mode):
        return [(path.name, path)]
    if not stat.S_ISDIR(mode):
        return []
    return [(entry.name, entry.path) for entry in _walk(path, "") if entry.refusal is None]


def _suffix(path: Path) -> str | None:
    lower = path.name.lower()
    # Longest first, so that "x.jsonl.gz" is not taken for something else.
    return next((s for s in sorted(SUPPORTED_SUFFIXES, key=len, reverse=True) if lower.endswith(s)), None)


def _check_suffix(path: Path, name: str) -> None:
    if _suffix(path) is None:
        raise DataReadError(f"{name}: unsupported file type; supported: {', '.join(SUPPORTED_SUFFIXES)}")


@dataclass(frozen=True, slots=True)
class _Entry:
    """A file to read and its display name; ``refusal`` says why it is not read (a link, a pipe...)."""

    path: Path
    name: str
    refusal: str | None


def _walk(folder: Path, name: str) -> list[_Entry]:
    """Everything under ``folder`` but folders and hidden entries, sorted by relative path; links never followed."""
    found: list[tuple[tuple[str, ...], str | None]] = []  # relative path, and why it is not read
    pending: list[tuple[str, ...]] = [()]
    while pending:
        parts = pending.pop()
        try:
            with os.scandir(folder.joinpath(*parts)) as listing:
                children = [(child.name, child.stat(follow_symlinks=False).st_mode) for child in listing]
        except OSError as exc:
            found.append((parts, f"cannot be listed: {exc.strerror}"))
            continue
        for child, mode in children:
            if child.startswith((".", "_")):
                logger.info("%s: skipping %s (hidden or metadata)", name, "/".join((*parts, child)))
            elif stat.S_ISDIR(mode):
                pending.append((*parts, child))
            else:
                found.append(((*parts, child), None if stat.S_ISREG(mode) else not_regular_reason(mode)))
    found.sort(key=lambda item: item[0])
    return [
        _Entry(folder.joinpath(*parts), "/".join((name, *parts)) if name else "/".join(parts), refusal)
        for parts, refusal in found
    ]


def _read_entry(entry: _Entry, limits: DataLimits) -> Iterator[Row | RowProblem]:
    """The rows of one file, opened only when it is a regular file (checked again once open)."""
    if entry.refusal is not None:
        yield RowProblem(entry.name, entry.refusal)
        return
    try:
        fh = open_regular(entry.path)
    except FileRefused as exc:
        yield RowProblem(entry.name, exc.reason)
        return
    with fh:
        suffix = _suffix(entry.path)
        if suffix == ".parquet":
            yield from _read_parquet(fh, entry.name, limits)
        elif suffix == ".csv":
            yield from _read_csv(fh, entry.name, limits)
        elif suffix == ".json":
            yield from _read_json_array(fh, entry.name, limits)
        elif suffix == ".jsonl.gz":
            with gzip.GzipFile(fileobj=fh, mode="rb") as inflated:
                yield from _jsonl_stream(LineReader(inflated, limits, compressed=fh), entry.name, limits)
        else:
            yield from _jsonl_stream(LineReader(fh, limits), entry.name, limits)


def _utf8_reason(line: bytes, start: int) -> str:
    """Where the first invalid byte is, as a character column in its line."""
    column = len(line[:start].decode("utf-8", "replace")) + 1
    return f"invalid UTF-8: byte 0x{line[start]:02x} at column {column}"


def _object_row(value: Any, where: str) -> Row | RowProblem:
    if isinstance(value, dict):
        return Row(where, value)
    return RowProblem(where, f"expected a JSON object, got {describe_type(value)}")


def _surrogate_problem(value: Any, where: str, text: str, start: int = 0, end: int | None = None) -> RowProblem | None:
    """A lone surrogate in a decoded value (only a ``\\ud800``-style escape in its text can make one)."""
    if not SURROGATE_ESCAPE.search(text, start, len(text) if end is None else end):
        return None
    found = find_surrogate(value)
    if found is None:
        return None
    path, char = found
    return RowProblem(where, surrogate_reason(char), field=path or None)


def _number_reason() -> str:
    """The value error :mod:`json` raises besides syntax errors: an integer too long to convert."""
    return f"invalid JSON: a number with more than {sys.get_int_max_str_digits()} digits"


# ------------------------------------------------------------------------------------ JSON Lines


def _jsonl_stream(lines: LineReader, name: str, limits: DataLimits) -> Iterator[Row | RowProblem]:
    lineno = 0
    while True:
        try:
            raw = lines.readline()
        except FileRefused as exc:
            yield RowProblem(f"{name}:{lineno + 1}", f"{exc.reason}; {_UNREADABLE}")
            return
        except (OSError, EOFError, zlib.error) as exc:  # a corrupt or truncated .gz file
            yield RowProblem(f"{name}:{lineno + 1}", f"cannot decompress: {exc}; {_UNREADABLE}")
            return
        if not raw:
            return
        lineno += 1
        where = f"{name}:{lineno}"
        if isinstance(raw, LongLine):
            yield RowProblem(where, row_too_long(raw.size, limits))
            continue
        item = _jsonl_line(raw[3:] if lineno == 1 and raw.startswith(_BOM) else raw, where, limits)
        if item is not None:
            yield item


def _jsonl_line(raw: bytes, where: str, limits: DataLimits) -> Row | RowProblem | None:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return RowProblem(where, _utf8_reason(raw, exc.start))
    if not text.strip():
        return None
    if too_deep(text, limits.json_depth) is not None:
        return RowProblem(where, deep_reason(limits))
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return RowProblem(where, json_error_reason(exc))
    except ValueError:
        return RowProblem(where, _number_reason())
    except RecursionError:  # not reached within the depth limit; kept as a last guard
        return RowProblem(where, deep_reason(limits))
    return _surrogate_problem(value, where, text) or _object_row(value, where)


# ------------------------------------------------------------------------------------ JSON array


class _LineCounter:
    """1-based line of increasing positions in a text, counting each newline once."""

    def __init__(self, text: str) -> None:
        self.text, self.pos, self.line = text, 0, 1

    def line_at(self, pos: int) -> int:
        self.line += self.text.count("\n", self.pos, pos)
        self.pos = pos
        return self.line

    def column_at(self, pos: int) -> int:
        return pos - self.text.rfind("\n", 0, pos)


def _read_json_array(fh: IO[bytes], name: str, limits: DataLimits) -> Iterator[Row | RowProblem]:
    size = os.fstat(fh.fileno()).st_size
    data = fh.read(limits.json_file_bytes + 1) if size <= limits.json_file_bytes else b""
    if max(size, len(data)) > limits.json_file_bytes:
        yield RowProblem(
            name,
            f"a JSON file of {size_text(max(size, len(data)))}: .json files are read whole, at most "
            f"{size_text(limits.json_file_bytes)}; write larger datasets as JSON Lines (.jsonl), one object per line",
        )
        return
    if data.startswith(_BOM):
        data = data[3:]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line_start = data.rfind(b"\n", 0, exc.start) + 1
        where = f"{name}:{data.count(_NEWLINE, 0, exc.start) + 1}"
        reason = _utf8_reason(data[line_start : exc.start + 1], exc.start - line_start)
        yield RowProblem(where, f"{reason}; the file cannot be read")
        return
    pos = _WHITESPACE.match(text).end()  # type: ignore[union-attr]  # the pattern matches the empty string
    if pos == len(text):
        return
    if text[pos] != "[":
        yield from _json_not_array(text, data, pos, name, limits)
        return
    yield from _json_elements(text, pos + 1, name, limits)


def _json_elements(text: str, pos: int, name: str, limits: DataLimits) -> Iterator[Row | RowProblem]:
    """The elements of the array opened just before ``pos``, each located at the line it starts."""
    decoder = json.JSONDecoder()
    lines = _LineCounter(text)
    skip = _WHITESPACE.match
    deep = too_deep(text, limits.json_depth + 1, top=1)  # the array is one level more
    pos = skip(text, pos).end()  # type: ignore[union-attr]
    if text.startswith("]", pos):
        pos += 1
    else:
        while True:
            where = f"{name}:{lines.line_at(pos)}"
            try:
                if deep is not None and pos >= deep:
                    raise RecursionError  # never handed to the parser
                value, end = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as exc:
                yield RowProblem(f"{name}:{exc.lineno}", f"{json_error_reason(exc, with_line=False)}; {_UNREADABLE}")
                return
            except ValueError:
                yield RowProblem(where, f"{_number_reason()}; {_UNREADABLE}")
                return
            except RecursionError:
                yield RowProblem(where, f"{deep_reason(limits)}; {_UNREADABLE}")
                return
            yield _json_element(value, text, pos, end, where, limits)
            pos = skip(text, end).end()  # type: ignore[union-attr]
            if text.startswith(",", pos):
                pos = skip(text, pos + 1).end()  # type: ignore[union-attr]
                continue
            if text.startswith("]", pos):
                pos += 1
                break
            where = f"{name}:{lines.line_at(pos)}"
            reason = f"invalid JSON: Expecting ',' delimiter (column {lines.column_at(pos)}); {_UNREADABLE}"
            yield RowProblem(where, reason)
            return
    pos = skip(text, pos).end()  # type: ignore[union-attr]
    if pos < len(text):
        yield RowProblem(f"{name}:{lines.line_at(pos)}", f"invalid JSON: Extra data (column {lines.column_at(pos)})")


def _json_element(value: Any, text: str, start: int, end: int, where: str, limits: DataLimits) -> Row | RowProblem:
    if (end - start) * 4 > limits.row_bytes:  # a character is 1 to 4 bytes: only then count them
        size = len(text[start:end].encode("utf-8"))
        if size > limits.row_bytes:
            return RowProblem(where, row_too_long(size, limits))
    return _surrogate_problem(value, where, text, start, end) or _object_row(value, where)


def _json_not_array(text: str, data: bytes, pos: int, name: str, limits: DataLimits) -> Iterator[Row | RowProblem]:
    """A ``.json`` file whose top level is not an array: JSON Lines under a ``.json`` name, or one problem.

    A file whose first line is a complete JSON object followed by more lines is read as JSON Lines,
    as Hugging Face ``datasets`` does; anything else is one problem for the whole file.
    """
    lines = _LineCounter(text)
    where = f"{name}:{lines.line_at(pos)}"
    if too_deep(text, limits.json_depth) == pos:
        yield RowProblem(where, f"{deep_reason(limits)}; the file cannot be read")
        return
    try:
        value, end = json.JSONDecoder().raw_decode(text, pos)
    except json.JSONDecodeError as exc:
        yield RowProblem(f"{name}:{exc.lineno}", f"{json_error_reason(exc, with_line=False)}; the file cannot be read")
        return
    except ValueError:
        yield RowProblem(where, f"{_number_reason()}; the file cannot be read")
        return
    rest = _WHITESPACE.match(text, end).end()  # type: ignore[union-attr]
    one_line_object = isinstance(value, dict) and "\n" not in text[pos:end]
    if one_line_object and rest < len(text) and "\n" in text[end:rest]:
        logger.info("%s holds one JSON object per line: reading it as JSON Lines", name)
        yield from _jsonl_stream(LineReader(io.BytesIO(data), limits), name, limits)
        return
    yield RowProblem(where, f"expected a JSON array of objects at the top level, got {describe_type(value)}")


# ------------------------------------------------------------------------------------ CSV


class _CsvLines:
    """Decoded physical lines for the csv parser, none of a record's held beyond ``limits.row_bytes``.

    Invalid UTF-8 is noted in ``bad`` (line -> reason) and replaced, so the parser stays in step. A
    record longer than the limit raises :class:`FileRefused`: where the parser stands inside it
    cannot be known without holding it.
    """

    def __init__(self, fh: IO[bytes], limits: DataLimits) -> None:
        self._lines, self._limits = LineReader(fh, limits), limits
        self.bad: dict[int, str] = {}
        self.record_bytes = 0

    def __iter__(self) -> Iterator[str]:
        lineno = 0
        while raw := self._lines.readline():
            lineno += 1
            size = raw.size if isinstance(raw, LongLine) else len(raw)
            self.record_bytes += size
            if isinstance(raw, LongLine) or self.record_bytes > self._limits.row_bytes:
                raise FileRefused(f"the record holds more than the {size_text(self._limits.row_bytes)} allowed per row")
            if lineno == 1 and raw.startswith(_BOM):
                raw = raw[3:]
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                self.bad[lineno] = _utf8_reason(raw, exc.start)
                yield raw.decode("utf-8", "replace")


def _read_csv(fh: IO[bytes], name: str, limits: DataLimits) -> Iterator[Row | RowProblem]:
    if csv.field_size_limit() < limits.row_bytes:  # our own record limit comes first, with a clearer message
        csv.field_size_limit(limits.row_bytes)
    lines = _CsvLines(fh, limits)
    bad = lines.bad
    reader = csv.reader(lines)
    header: list[str] = []
    previous_end = 0
    while True:
        try:
            record = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield RowProblem(f"{name}:{previous_end + 1}", f"invalid CSV: {exc}; {_UNREADABLE}")
            return
        except FileRefused as exc:
            yield RowProblem(f"{name}:{previous_end + 1}", f"{exc.reason}; {_UNREADABLE}")
            return
        start, previous_end = previous_end + 1, reader.line_num
        lines.record_bytes = 0
        if not record:  # a blank line
            continue
        # The parser reads no further than the record's last line: what ``bad`` holds is this record's.
        bad_line = min(bad) if bad else None
        if not header:
            problem = _csv_header_problem(record, bad.get(bad_line) if bad_line else None)
            if problem:
                yield RowProblem(f"{name}:{bad_line or start}", problem)
                return
            header = record
        elif bad_line is not None:
            yield RowProblem(f"{name}:{bad_line}", bad[bad_line])
        elif len(record) != len(header):
            reason = f"expected {len(header)} fields as in the header, got {len(record)}"
            yield RowProblem(f"{name}:{start}", reason)
        else:
            yield _csv_row(dict(zip(header, record, strict=True)), f"{name}:{start}", limits)
        bad.clear()


def _csv_row(record: dict[str, str], where: str, limits: DataLimits) -> Row | RowProblem:
    """A CSV record; a cell of JSON text (a list of messages) is held to the JSON depth limit as well."""
    for column, cell in record.items():
        if cell.lstrip().startswith("[") and too_deep(cell, limits.json_depth) is not None:
            return RowProblem(where, deep_reason(limits), field=column)
    return Row(where, record)


def _csv_header_problem(header: list[str], bad_utf8: str | None) -> str | None:
    if bad_utf8:
        return f"{bad_utf8}; the header cannot be read"
    seen: set[str] = set()
    for column in header:
        if column in seen:
            return f"column '{column}' appears twice in the header; the file cannot be read"
        seen.add(column)
    return None


# ------------------------------------------------------------------------------------ Parquet


def _read_parquet(fh: IO[bytes], name: str, limits: DataLimits) -> Iterator[Row | RowProblem]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    errors = (pa.ArrowException, OSError)
    try:
        parquet = pq.ParquetFile(fh)
    except errors as exc:
        yield RowProblem(name, f"not a readable Parquet file: {exc}")
        return
    with parquet:
        problem = _parquet_size_problem(parquet.metadata, os.fstat(fh.fileno()).st_size, limits)
        if problem:
            yield RowProblem(name, problem)
            return
        batches = parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS)
        count = 0
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except errors as exc:
                yield RowProblem(f"{name}:row {count + 1}", f"cannot read the Parquet file: {exc}; {_UNREADABLE}")
                return
            for record in batch.to_pylist():
                count += 1
                yield Row(f"{name}:row {count}", record)


def _parquet_size_problem(metadata: Any, file_bytes: int, limits: DataLimits) -> str | None:
    """Inflation as the file's own metadata declares it (Parquet pages are compressed)."""
    inflated = sum(metadata.row_group(i).total_byte_size for i in range(metadata.num_row_groups))
    return inflation_problem(inflated, file_bytes, limits)
