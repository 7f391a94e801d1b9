"""Read dataset files into located rows: JSONL (optionally gzipped), JSON arrays, CSV and Parquet.

Every record becomes a :class:`Row` or a :class:`RowProblem` that says where it is and what is
wrong; a bad record never stops the file and is never dropped silently. Only blank JSONL and CSV
lines are ignored: they are not records.

Memory stays bounded: JSONL and CSV are streamed line by line and Parquet by record batches. A
JSON array file is the exception: it is decoded whole (the format has no cheap way to stream it),
so large datasets should use JSONL or Parquet.

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
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Protocol

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
#: CSV cells may hold long texts; the csv module's default limit is 128 KiB per field.
_CSV_FIELD_LIMIT = 64 * 1024 * 1024


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


def read_rows(path: Path, display_name: str | None = None) -> Iterator[Row | RowProblem]:
    """Read a data file, or every data file in a folder, as located rows and problems.

    Args:
        path: A ``.jsonl``, ``.jsonl.gz``, ``.json``, ``.csv`` or ``.parquet`` file, or a folder
            holding such files (read recursively, sorted by their relative path). Files and folders
            whose name starts with ``.`` or ``_`` (``.DS_Store``, ``_SUCCESS``) are skipped.
        display_name: The name used in ``where`` (usually the path inside the tenant's bucket);
            defaults to the file or folder name. A folder's files are named ``<display_name>/<relative path>``.

    Returns:
        An iterator of rows and problems in file order. ``where`` is ``"<name>:<line>"`` (1-based
        physical line where the record starts) or ``"<name>:row <n>"`` for Parquet. An empty file
        (or folder) gives nothing: the caller reports that there are no rows.

    Raises:
        DataReadError: When ``path`` does not exist, is not a supported file type, or is a folder
            holding a file of an unsupported type. Raised at call time, before any row is read.
    """
    name = path.name if display_name is None else display_name.rstrip("/")
    if not path.exists():
        raise DataReadError(f"{name}: not found")
    if path.is_dir():
        files = _folder_files(path, name)
        return (item for file, file_name in files for item in _read_file(file, file_name))
    _check_suffix(path, name)
    return _read_file(path, name)


def _suffix(path: Path) -> str | None:
    lower = path.name.lower()
    # Longest first, so that "x.jsonl.gz" is not taken for something else.
    return next((s for s in sorted(SUPPORTED_SUFFIXES, key=len, reverse=True) if lower.endswith(s)), None)


def _check_suffix(path: Path, name: str) -> None:
    if _suffix(path) is None:
        raise DataReadError(f"{name}: unsupported file type; supported: {', '.join(SUPPORTED_SUFFIXES)}")


def _folder_files(folder: Path, name: str) -> list[tuple[Path, str]]:
    """The data files under ``folder`` with their display names, sorted; every one checked first."""
    found: list[tuple[tuple[str, ...], Path]] = []
    for root, dirs, files in os.walk(folder):
        for skipped in [entry for entry in (*dirs, *files) if entry.startswith((".", "_"))]:
            logger.info("%s: skipping %s (hidden or metadata)", name, Path(root, skipped).relative_to(folder))
        dirs[:] = [d for d in dirs if not d.startswith((".", "_"))]
        for file in files:
            if file.startswith((".", "_")):
                continue
            full = Path(root) / file
            found.append((full.relative_to(folder).parts, full))
    found.sort()
    result = [(full, "/".join((name, *parts)) if name else "/".join(parts)) for parts, full in found]
    for full, file_name in result:
        _check_suffix(full, file_name)
    return result


def _read_file(path: Path, name: str) -> Iterator[Row | RowProblem]:
    suffix = _suffix(path)
    if suffix == ".parquet":
        return _read_parquet(path, name)
    if suffix == ".csv":
        return _read_csv(path, name)
    if suffix == ".json":
        return _read_json_array(path, name)
    return _read_jsonl(path, name, gzipped=suffix == ".jsonl.gz")


def _utf8_reason(line: bytes, start: int) -> str:
    """Where the first invalid byte is, as a character column in its line."""
    column = len(line[:start].decode("utf-8", "replace")) + 1
    return f"invalid UTF-8: byte 0x{line[start]:02x} at column {column}"


def _object_row(value: Any, where: str) -> Row | RowProblem:
    if isinstance(value, dict):
        return Row(where, value)
    return RowProblem(where, f"expected a JSON object, got {describe_type(value)}")


# ------------------------------------------------------------------------------------ JSON Lines


def _read_jsonl(path: Path, name: str, *, gzipped: bool) -> Iterator[Row | RowProblem]:
    with gzip.open(path, "rb") if gzipped else path.open("rb") as fh:
        yield from _jsonl_stream(fh, name)


class _LineSource(Protocol):
    def readline(self) -> bytes: ...


def _jsonl_stream(fh: _LineSource, name: str) -> Iterator[Row | RowProblem]:
    lineno = 0
    while True:
        try:
            raw = fh.readline()
        except (OSError, EOFError, zlib.error) as exc:  # a corrupt or truncated .gz file
            yield RowProblem(f"{name}:{lineno + 1}", f"cannot decompress: {exc}; {_UNREADABLE}")
            return
        if not raw:
            return
        lineno += 1
        item = _jsonl_line(raw[3:] if lineno == 1 and raw.startswith(_BOM) else raw, f"{name}:{lineno}")
        if item is not None:
            yield item


def _jsonl_line(raw: bytes, where: str) -> Row | RowProblem | None:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return RowProblem(where, _utf8_reason(raw, exc.start))
    if not text.strip():
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return RowProblem(where, json_error_reason(exc))
    return _object_row(value, where)


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


def _read_json_array(path: Path, name: str) -> Iterator[Row | RowProblem]:
    data = path.read_bytes()
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
        yield from _json_not_array(text, data, pos, name)
        return
    yield from _json_elements(text, pos + 1, name)


def _json_elements(text: str, pos: int, name: str) -> Iterator[Row | RowProblem]:
    """The elements of the array opened just before ``pos``, each located at the line it starts."""
    decoder = json.JSONDecoder()
    lines = _LineCounter(text)
    skip = _WHITESPACE.match
    pos = skip(text, pos).end()  # type: ignore[union-attr]
    if text.startswith("]", pos):
        pos += 1
    else:
        while True:
            try:
                value, end = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as exc:
                yield RowProblem(f"{name}:{exc.lineno}", f"{json_error_reason(exc, with_line=False)}; {_UNREADABLE}")
                return
            yield _object_row(value, f"{name}:{lines.line_at(pos)}")
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


def _json_not_array(text: str, data: bytes, pos: int, name: str) -> Iterator[Row | RowProblem]:
    """A ``.json`` file whose top level is not an array: JSON Lines under a ``.json`` name, or one problem.

    A file whose first line is a complete JSON object followed by more lines is read as JSON Lines,
    as Hugging Face ``datasets`` does; anything else is one problem for the whole file.
    """
    lines = _LineCounter(text)
    try:
        value, end = json.JSONDecoder().raw_decode(text, pos)
    except json.JSONDecodeError as exc:
        yield RowProblem(f"{name}:{exc.lineno}", f"{json_error_reason(exc, with_line=False)}; the file cannot be read")
        return
    rest = _WHITESPACE.match(text, end).end()  # type: ignore[union-attr]
    one_line_object = isinstance(value, dict) and "\n" not in text[pos:end]
    if one_line_object and rest < len(text) and "\n" in text[end:rest]:
        logger.info("%s holds one JSON object per line: reading it as JSON Lines", name)
        yield from _jsonl_stream(io.BytesIO(data), name)
        return
    where = f"{name}:{lines.line_at(pos)}"
    yield RowProblem(where, f"expected a JSON array of objects at the top level, got {describe_type(value)}")


# ------------------------------------------------------------------------------------ CSV


def _decoded_lines(fh: IO[bytes], bad: dict[int, str]) -> Iterator[str]:
    """Decode each physical line, noting invalid UTF-8 in ``bad`` so the CSV parser stays in step."""
    for lineno, raw in enumerate(fh, 1):
        if lineno == 1 and raw.startswith(_BOM):
            raw = raw[3:]
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            bad[lineno] = _utf8_reason(raw, exc.start)
            yield raw.decode("utf-8", "replace")


def _read_csv(path: Path, name: str) -> Iterator[Row | RowProblem]:
    if csv.field_size_limit() < _CSV_FIELD_LIMIT:
        csv.field_size_limit(_CSV_FIELD_LIMIT)
    bad: dict[int, str] = {}
    with path.open("rb") as fh:
        reader = csv.reader(_decoded_lines(fh, bad))
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
            start, previous_end = previous_end + 1, reader.line_num
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
                yield Row(f"{name}:{start}", dict(zip(header, record, strict=True)))
            bad.clear()


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


def _read_parquet(path: Path, name: str) -> Iterator[Row | RowProblem]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    errors = (pa.ArrowException, OSError)
    try:
        parquet = pq.ParquetFile(path)
    except errors as exc:
        yield RowProblem(name, f"not a readable Parquet file: {exc}")
        return
    with parquet:
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
