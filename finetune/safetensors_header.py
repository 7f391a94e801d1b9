"""Read a safetensors file's header without trusting it.

A safetensors file is an 8-byte little-endian header length, a JSON header naming each tensor's
dtype, shape and byte range, then the tensor data. An uploaded file is hostile until checked: the
length may claim an exabyte, the JSON may be nested thousands deep, offsets may point past the
end of the file or overlap. :func:`read_header` bounds every read and checks the header the way
the reference loader does (contiguous, non-overlapping ranges that cover the data exactly), and
answers with located problems instead of raising.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import stat
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from finetune.errors import Issue

#: The reference implementation's limit on the header (``MAX_HEADER_SIZE`` in safetensors).
MAX_HEADER_BYTES = 100_000_000
#: A well-formed header nests three deep (header -> tensor -> shape); anything far deeper is hostile.
MAX_DEPTH = 8
#: Bits per element of every dtype the reference loader (0.8) accepts.
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8,
    "F8_E8M0": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32,
    "C64": 64, "F64": 64, "I64": 64, "U64": 64,
}  # fmt: skip
_LENGTH_BYTES = 8
_TENSOR_KEYS = frozenset({"dtype", "shape", "data_offsets"})
_STRINGS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_BRACKETS = re.compile(r"[\[\]{}]")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class HeaderSummary:
    """What a valid header declares.

    Attributes:
        header_bytes: Length of the JSON header.
        data_bytes: Length of the tensor data that follows it.
        tensors: Every tensor, in the order of its data.
        metadata: The free-form ``__metadata__`` strings.
    """

    header_bytes: int
    data_bytes: int
    tensors: tuple[TensorInfo, ...]
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def parameters(self) -> int:
        return sum(math.prod(t.shape) for t in self.tensors)

    @property
    def dtypes(self) -> dict[str, int]:
        """Number of tensors of each dtype."""
        counts: dict[str, int] = {}
        for t in self.tensors:
            counts[t.dtype] = counts.get(t.dtype, 0) + 1
        return counts


def read_header(fh: BinaryIO, size: int, name: str) -> tuple[HeaderSummary | None, list[Issue]]:
    """Check the header of the safetensors file open as ``fh``.

    Args:
        fh: The file, opened in binary mode and positioned at its start.
        size: The file's size in bytes (from ``fstat``, not from the header).
        name: How problems name the file.

    Returns:
        The summary and no problems, or None and every problem found, each naming ``name``.
    """

    def problem(message: str, path: str = "") -> tuple[None, list[Issue]]:
        return None, [Issue(path, message, file=name)]

    if size < _LENGTH_BYTES:
        return problem(f"not a safetensors file: {size} bytes, shorter than the 8-byte header length")
    length = int.from_bytes(fh.read(_LENGTH_BYTES), "little")
    limit = min(MAX_HEADER_BYTES, size - _LENGTH_BYTES)
    if length > limit:
        return problem(f"header length {length} is more than the {limit} bytes allowed (file of {size} bytes)")
    raw = fh.read(length)
    if len(raw) != length:
        return problem(f"file ended inside the header ({len(raw)} of {length} bytes)")
    header, issue = _parse_json(raw, name)
    if issue is not None or header is None:
        return None, [issue] if issue else []
    return check_header(header, length, size - _LENGTH_BYTES - length, name)


def read_header_bytes(blob: bytes, name: str) -> tuple[HeaderSummary | None, list[Issue]]:
    """:func:`read_header` on a file's whole content held in memory."""
    return read_header(io.BytesIO(blob), len(blob), name)


def _parse_json(raw: bytes, name: str) -> tuple[dict[str, Any] | None, Issue | None]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, Issue("", f"header is not UTF-8 text (byte {exc.start})", file=name)
    text = text.strip(" ")
    if not text.startswith("{"):
        return None, Issue("", "header is not a JSON object", file=name)
    depth = _max_depth(text)
    if depth > MAX_DEPTH:
        return None, Issue("", f"header JSON nests {depth} deep, more than {MAX_DEPTH}", file=name)
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        return None, Issue("", f"header is not valid JSON: {str(exc)[:200]}", file=name)
    if not isinstance(data, dict):
        return None, Issue("", "header is not a JSON object", file=name)
    return data, None


def _max_depth(text: str) -> int:
    """How deep the brackets outside strings nest (an unterminated string counts as deep as it goes)."""
    depth = deepest = 0
    for match in _BRACKETS.finditer(_STRINGS.sub('""', text)):
        depth += 1 if match.group() in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for key, value in pairs:
        if key in data:
            raise ValueError(f"duplicate key {key[:100]!r}")
        data[key] = value
    return data


def _no_constant(token: str) -> Any:
    raise ValueError(f"{token} is not a JSON number")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _tensor(key: str, entry: Any, data_bytes: int) -> tuple[TensorInfo | None, list[Issue]]:
    """One tensor entry, or what is wrong with it (paths are ``<tensor>.<field>``)."""
    if not isinstance(entry, dict):
        return None, [Issue(key, "tensor entry is not a JSON object")]
    issues = []
    if set(entry) != _TENSOR_KEYS:
        got = ", ".join(sorted(entry))[:200]
        issues.append(Issue(key, f"tensor entry needs exactly dtype, shape and data_offsets (has: {got})"))
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if "dtype" in entry and (not isinstance(dtype, str) or dtype not in DTYPE_BITS):
        issues.append(Issue(f"{key}.dtype", f"unknown dtype {str(dtype)[:40]!r}"))
    if "shape" in entry and (not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape)):
        issues.append(Issue(f"{key}.shape", "must be a list of non-negative integers"))
    if "data_offsets" in entry:
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
            issues.append(Issue(f"{key}.data_offsets", "must be two integers [begin, end]"))
        elif not 0 <= offsets[0] <= offsets[1] <= data_bytes:
            issues.append(
                Issue(f"{key}.data_offsets", f"[{offsets[0]}, {offsets[1]}] is not within the {data_bytes} data bytes")
            )
    if issues:
        return None, issues
    assert isinstance(dtype, str) and isinstance(shape, list) and isinstance(offsets, list)
    bits = math.prod(shape) * DTYPE_BITS[dtype]
    if bits % 8 or bits // 8 != offsets[1] - offsets[0]:
        return None, [
            Issue(
                f"{key}.data_offsets",
                f"holds {offsets[1] - offsets[0]} bytes but {dtype} of shape {shape} needs {bits / 8:g}",
            )
        ]
    return TensorInfo(key, dtype, tuple(shape), offsets[0], offsets[1]), []


def _layout_issues(tensors: list[TensorInfo], data_bytes: int) -> list[Issue]:
    """Overlaps, holes and uncovered data, in data order (the loader needs exact coverage)."""
    issues = []
    end, last = 0, None
    for t in sorted(tensors, key=lambda t: (t.begin, t.end)):
        if t.begin < end:
            issues.append(Issue(f"{t.name}.data_offsets", f"[{t.begin}, {t.end}] overlaps tensor {last!r}"))
        elif t.begin > end:
            issues.append(Issue(f"{t.name}.data_offsets", f"leaves a gap of {t.begin - end} bytes before it"))
        if t.end >= end:
            end, last = t.end, t.name
    if not issues and end != data_bytes:
        issues.append(Issue("", f"tensors cover {end} of the {data_bytes} data bytes"))
    return issues


def check_header(
    header: dict[str, Any], header_bytes: int, data_bytes: int, name: str
) -> tuple[HeaderSummary | None, list[Issue]]:
    """Check a parsed header against the size of the data that follows it."""
    issues: list[Issue] = []
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        issues.append(Issue("__metadata__", "must map names to strings"))
        metadata = {}
    tensors = []
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        tensor, problems = _tensor(key, entry, data_bytes)
        issues += problems
        if tensor is not None:
            tensors.append(tensor)
    if not issues:
        issues = _layout_issues(tensors, data_bytes)
    if issues:
        return None, [Issue(i.path, i.message, file=name) for i in issues]
    ordered = tuple(sorted(tensors, key=lambda t: (t.begin, t.end)))
    return HeaderSummary(header_bytes, data_bytes, ordered, dict(metadata)), []


def read_header_of(path: str | os.PathLike[str], name: str | None = None) -> tuple[HeaderSummary | None, list[Issue]]:
    """:func:`read_header` of a regular file at ``path``; a link or special file is a problem."""
    label = name or os.fspath(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        return None, [Issue("", f"cannot be opened as a plain file: {exc.strerror}", file=label)]
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode):
            return None, [Issue("", "not a regular file", file=label)]
        return read_header(fh, st.st_size, label)
