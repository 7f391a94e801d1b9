"""Hostile datasets: links, pipes, devices, huge rows, decompression bombs, deep nesting, bad Unicode.

Each case is a located problem, never a crash, a hang or a full memory. Cases that would exhaust the
machine if they regressed run in a subprocess under a 2 GiB address-space limit and a timeout; the
rest run under an alarm, so a hang fails the test instead of stalling the suite.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from finetune.data.limits import DEFAULT_DATA_LIMITS, DataLimits, FileRefused, open_regular
from finetune.data.pipeline import DataError, _local_files, prepare
from finetune.data.readers import dataset_files, read_rows
from finetune.data.tokenize import tokenize_sample
from finetune.data.types import Message, Row, RowProblem, Sample
from finetune.errors import FinetuneError
from finetune.loading import ensure_tiny, load_tokenizer
from finetune.recipe import Recipe
from finetune.registry import Registry
from finetune.settings import get_settings
from finetune.storage import Bucket

ROOT = Path(__file__).resolve().parents[2]
MODEL = "smollm2-135m-instruct"
REGULAR_ONLY = "datasets are read as regular files only"
LINK = f"a symbolic link; {REGULAR_ONLY}"
FIFO = f"a named pipe (FIFO); {REGULAR_ONLY}"
REST = "; the rest of the file cannot be read"
DEEP = "nested deeper than 64 levels of arrays and objects"


def items(path: Path, display_name: str | None = None, **kwargs: object) -> list[tuple[str, object]]:
    out: list[tuple[str, object]] = []
    for item in read_rows(path, display_name, **kwargs):  # type: ignore[arg-type]
        out.append((item.where, item.record) if isinstance(item, Row) else (item.where, item.reason))
    return out


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def chat(q: str, a: str) -> str:
    return json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})


GOOD = [chat(f"question {i}", f"answer {i}") for i in range(60)]


@pytest.fixture(autouse=True)
def alarm() -> Iterator[None]:
    """Fail a test that hangs (a pipe opened for reading blocks until a writer comes) after 20 s."""

    def hung(signum: int, frame: object) -> None:
        raise TimeoutError("hung on hostile input")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


#: Reads a path in a child process under a 2 GiB address-space limit; prints what it read and its peak memory.
_LIMITED = """
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
from pathlib import Path
from finetune.data.readers import read_rows
got = [[i.where, None if hasattr(i, "record") else i.reason] for i in read_rows(Path(sys.argv[1]), sys.argv[2])]
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))  # ru_maxrss spans the fork
print(json.dumps({"items": got, "peak_mib": int(hwm.split()[1]) // 1024}))
"""


def read_limited(path: Path, name: str) -> tuple[list[tuple[str, str | None]], int]:
    """(where, reason or None for a row) of everything read, and the child's peak memory in MiB."""
    done = subprocess.run(
        [sys.executable, "-c", _LIMITED, str(path), name], capture_output=True, text=True, timeout=20, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    return [tuple(item) for item in result["items"]], result["peak_mib"]


def test_limits_are_positive_integers():
    assert DEFAULT_DATA_LIMITS == DataLimits() and DEFAULT_DATA_LIMITS.row_bytes == 8 << 20
    with pytest.raises(ValueError, match=r"^DataLimits\.json_depth must be a positive integer, got 0$"):
        DataLimits(json_depth=0)


# ------------------------------------------------------------------------------------ regular files only


def test_a_link_inside_a_folder_is_refused_and_never_read(tmp_path):
    other_tenant = write(tmp_path / "other" / "secret.jsonl", b'{"text": "another tenant\'s data"}\n')
    write(tmp_path / "data" / "a.jsonl", b'{"text": "mine"}\n')
    (tmp_path / "data" / "b.jsonl").symlink_to(other_tenant)
    (tmp_path / "data" / "passwd.jsonl").symlink_to("/etc/passwd")
    (tmp_path / "data" / "sub").mkdir()
    (tmp_path / "data" / "sub" / "linked").symlink_to(tmp_path / "other", target_is_directory=True)
    assert items(tmp_path / "data", "data") == [
        ("data/a.jsonl:1", {"text": "mine"}),
        ("data/b.jsonl", LINK),
        ("data/passwd.jsonl", LINK),
        ("data/sub/linked", LINK),  # a linked folder is neither followed nor taken for an unsupported file
    ]
    assert dataset_files(tmp_path / "data") == [("a.jsonl", tmp_path / "data" / "a.jsonl")]


def test_the_top_path_as_a_link_is_refused(tmp_path):
    target = write(tmp_path / "real.jsonl", b'{"text": "a"}\n')
    (tmp_path / "x.jsonl").symlink_to(target)
    (tmp_path / "folder").symlink_to(tmp_path, target_is_directory=True)
    assert items(tmp_path / "x.jsonl", "data/x.jsonl") == [("data/x.jsonl", LINK)]
    assert items(tmp_path / "folder", "data/folder/") == [("data/folder", LINK)]
    assert dataset_files(tmp_path / "x.jsonl") == [] and dataset_files(tmp_path / "folder") == []


def test_fifos_sockets_and_devices_are_refused_without_blocking(tmp_path):
    write(tmp_path / "data" / "a.jsonl", b'{"text": "a"}\n')
    os.mkfifo(tmp_path / "data" / "f.jsonl")
    os.mkfifo(tmp_path / "top.jsonl")
    with socket.socket(socket.AF_UNIX) as listening:
        listening.bind(str(tmp_path / "data" / "s.jsonl"))
        assert items(tmp_path / "data", "data") == [
            ("data/a.jsonl:1", {"text": "a"}),
            ("data/f.jsonl", FIFO),
            ("data/s.jsonl", f"a socket; {REGULAR_ONLY}"),
        ]
    assert items(tmp_path / "top.jsonl") == [("top.jsonl", FIFO)]
    assert items(Path("/dev/null"), "data/n.jsonl") == [("data/n.jsonl", f"a device; {REGULAR_ONLY}")]
    assert [name for name, _ in dataset_files(tmp_path / "data")] == ["a.jsonl"]


def test_a_file_swapped_after_the_check_is_refused_once_open(tmp_path, monkeypatch):
    os.mkfifo(tmp_path / "f.jsonl")
    (tmp_path / "l.jsonl").symlink_to(write(tmp_path / "real.jsonl", b'{"text": "a"}\n'))
    regular = os.stat(tmp_path / "real.jsonl")
    monkeypatch.setattr(os, "lstat", lambda path: regular)  # the check sees a regular file; the swap came after
    with pytest.raises(FileRefused, match=rf"^a named pipe \(FIFO\); {REGULAR_ONLY}$"):
        open_regular(tmp_path / "f.jsonl")
    with pytest.raises(FileRefused, match=rf"^a symbolic link; {REGULAR_ONLY}$"):
        open_regular(tmp_path / "l.jsonl")


def test_a_link_to_dev_zero_is_refused_within_bounded_memory(tmp_path):
    write(tmp_path / "data" / "a.jsonl", b'{"text": "a"}\n')
    (tmp_path / "data" / "z.jsonl").symlink_to("/dev/zero")
    got, peak = read_limited(tmp_path / "data", "data")
    assert got == [("data/a.jsonl:1", None), ("data/z.jsonl", LINK)]
    assert peak < 256


def test_an_unreadable_file_is_a_located_problem(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root reads any file")
    path = write(tmp_path / "t.jsonl", b'{"text": "a"}\n')
    path.chmod(0)
    assert items(path) == [("t.jsonl", "cannot be read: Permission denied")]


# ------------------------------------------------------------------------------------ bytes per row


def test_a_21_mb_row_is_skipped_in_bounded_memory_and_reading_goes_on(tmp_path):
    row = b'{"text": "' + b"a" * 21_000_000 + b'"}'
    path = write(tmp_path / "t.jsonl", b'{"text": "first"}\n' + row + b'\n{"text": "after"}\n' + row)
    got, peak = read_limited(path, "data/t.jsonl")
    too_long = f"the row holds {len(row):,} bytes, more than the 8 MiB allowed per row"
    assert got == [
        ("data/t.jsonl:1", None),
        ("data/t.jsonl:2", too_long),
        ("data/t.jsonl:3", None),
        ("data/t.jsonl:4", too_long),
    ]
    assert peak < 256


def test_row_limit_boundary_and_crlf(tmp_path):
    limits = DataLimits(row_bytes=16)
    exact = b'{"text": "1234"}'  # 16 bytes
    path = write(tmp_path / "t.jsonl", exact + b"\n" + exact[:-1] + b'5"}\r\n' + exact)
    assert items(path, limits=limits) == [
        ("t.jsonl:1", {"text": "1234"}),
        ("t.jsonl:2", "the row holds 19 bytes, more than the 16 bytes allowed per row"),  # the CR counts
        ("t.jsonl:3", {"text": "1234"}),
    ]


def test_a_long_csv_record_stops_the_file_with_a_located_problem(tmp_path):
    limits = DataLimits(row_bytes=64)
    long_line = b"x" * 100 + b",y\n"
    multi_line = b'"' + b"line\n" * 20 + b'",y\n'  # short lines, one long quoted field
    for data in (long_line, multi_line):
        path = write(tmp_path / "t.csv", b"text,label\nok,a\n" + data + b"never,read\n")
        assert items(path, limits=limits) == [
            ("t.csv:2", {"text": "ok", "label": "a"}),
            ("t.csv:3", f"the record holds more than the 64 bytes allowed per row{REST}"),
        ]


def test_a_json_file_too_large_to_decode_whole_is_refused_pointing_to_jsonl(tmp_path):
    path = write(tmp_path / "t.json", b"[" + b",".join([b'{"text": "a"}'] * 200) + b"]")
    assert items(path, limits=DataLimits(json_file_bytes=1024)) == [
        (
            "t.json",
            "a JSON file of 2.7 KiB: .json files are read whole, at most 1 KiB; "
            "write larger datasets as JSON Lines (.jsonl), one object per line",
        ),
    ]
    big = write(tmp_path / "u.json", b"[" + b'{"text": "' + b"a" * 100 + b'"}, {"text": "b"}]')
    assert items(big, limits=DataLimits(row_bytes=64)) == [
        ("u.json:1", "the row holds 112 bytes, more than the 64 bytes allowed per row"),
        ("u.json:1", {"text": "b"}),
    ]


def test_a_huge_integer_is_a_row_problem(tmp_path):
    path = write(tmp_path / "t.jsonl", b'{"n": ' + b"1" * 5000 + b'}\n{"n": 1}\n')
    digits = sys.get_int_max_str_digits()
    assert items(path) == [
        ("t.jsonl:1", f"invalid JSON: a number with more than {digits} digits"),
        ("t.jsonl:2", {"n": 1}),
    ]


# ------------------------------------------------------------------------------------ decompression bombs


def gzip_of_repeats(path: Path, head: bytes, piece: bytes, times: int, tail: bytes) -> Path:
    """A multi-member gzip file: ``head + piece * times + tail``, compressing ``piece`` once."""
    member = gzip.compress(piece, compresslevel=9)
    with path.open("wb") as fh:
        fh.write(gzip.compress(head))
        for _ in range(times):
            fh.write(member)
        fh.write(gzip.compress(tail))
    return path


def test_a_one_line_gzip_bomb_is_refused_in_bounded_memory(tmp_path):
    # 3 GiB of zeros in one JSON string, about 3 MB compressed.
    path = gzip_of_repeats(tmp_path / "t.jsonl.gz", b'{"text": "', b"0" * (64 << 20), 48, b'"}\n{"text": "a"}\n')
    got, peak = read_limited(path, "data/t.jsonl.gz")
    assert got == [("data/t.jsonl.gz:1", f"inflates more than 200 times over, as a decompression bomb does{REST}")]
    assert peak < 256


def test_a_gzip_bomb_of_many_rows_is_refused_after_the_rows_before_it(tmp_path):
    row = b'{"text": "' + b"0" * 4000 + b'"}\n'
    piece = row * ((16 << 20) // len(row))
    path = gzip_of_repeats(tmp_path / "t.jsonl.gz", b"", piece, 600, b"")  # about 10 MB compressed, 10 GB inflated
    assert 5 << 20 < path.stat().st_size < 20 << 20
    got, peak = read_limited(path, "t.jsonl.gz")
    *rows, (where, reason) = got
    assert reason == f"inflates more than 200 times over, as a decompression bomb does{REST}"
    assert where == f"t.jsonl.gz:{len(rows) + 1}" and len(rows) > 1000 and all(r is None for _, r in rows)
    assert peak < 256


def test_the_inflated_size_of_a_file_is_bounded(tmp_path):
    rows = b"".join(b'{"text": "%d"}\n' % i for i in range(20_000))  # 370 KiB
    path = write(tmp_path / "t.jsonl.gz", gzip.compress(rows))
    limits = DataLimits(inflated_bytes=128 << 10, ratio_after_bytes=1 << 30)
    *read, (where, reason) = items(path, limits=limits)
    assert reason == f"inflates to more than 128 KiB, the most a compressed file may hold{REST}"
    assert where == f"t.jsonl.gz:{len(read) + 1}" and 0 < len(read) < 20_000
    assert len(items(path)) == 20_000  # under the default limits


# ------------------------------------------------------------------------------------ nesting


def nested(depth: int) -> bytes:
    return b'{"a": ' * depth + b"1" + b"}" * depth


def test_deep_nesting_in_a_row_is_a_row_problem_checked_before_parsing(tmp_path):
    brackets_in_strings = json.dumps({"text": "[" * 500 + "{" * 500 + '\\"['}).encode()
    data = b"[" * 100_000 + b"\n" + nested(64) + b"\n" + nested(65) + b"\n" + brackets_in_strings + b"\n"
    got = items(write(tmp_path / "t.jsonl", data))
    assert [(where, reason if isinstance(reason, str) else "row") for where, reason in got] == [
        ("t.jsonl:1", DEEP),
        ("t.jsonl:2", "row"),
        ("t.jsonl:3", DEEP),
        ("t.jsonl:4", "row"),
    ]


def test_deep_nesting_in_a_json_file(tmp_path):
    deep = write(tmp_path / "t.json", b"[" * 100_000)
    assert items(deep) == [("t.json:1", f"{DEEP}{REST}")]
    element = write(tmp_path / "u.json", b'[{"a": 1},\n' + nested(64) + b",\n" + nested(65) + b"]")
    got = items(element)
    assert got[0] == ("u.json:1", {"a": 1}) and got[1][0] == "u.json:2"
    assert got[2] == ("u.json:3", f"{DEEP}{REST}") and len(got) == 3
    top = write(tmp_path / "v.json", nested(100_000))
    assert items(top) == [("v.json:1", f"{DEEP}; the file cannot be read")]


def test_deep_json_text_in_a_csv_cell_is_a_row_problem(tmp_path):
    path = write(tmp_path / "t.csv", b"messages\n" + b"[" * 100_000 + b"\n")
    got = list(read_rows(path))
    assert got == [RowProblem("t.csv:2", DEEP, field="messages")]


# ------------------------------------------------------------------------------------ Unicode


def test_a_lone_surrogate_is_a_located_row_problem(tmp_path):
    rows = [
        b'{"text": "ok \\ud83d\\ude80"}',  # a pair: the rocket emoji
        b'{"text": "\\ud800"}',
        b'{"messages": [{"role": "user", "content": "x\\udfff"}]}',
        b'{"\\udc00": 1}',
        b'{"text": "\\\\ud800 is how it is written"}',  # an escaped backslash: plain text
    ]
    got = list(read_rows(write(tmp_path / "t.jsonl", b"\n".join(rows))))
    reason = "contains an unpaired surrogate \\u{}: not valid Unicode".format
    assert got == [
        Row("t.jsonl:1", {"text": "ok 🚀"}),
        RowProblem("t.jsonl:2", reason("d800"), field="text"),
        RowProblem("t.jsonl:3", reason("dfff"), field="messages[0].content"),
        RowProblem("t.jsonl:4", reason("dc00")),
        Row("t.jsonl:5", {"text": "\\ud800 is how it is written"}),
    ]
    assert str(got[2]) == "t.jsonl:3: messages[0].content: contains an unpaired surrogate \\udfff: not valid Unicode"
    array = write(tmp_path / "t.json", b'[{"text": "a"},\n {"text": "\\ud800"}]')
    assert items(array) == [("t.json:1", {"text": "a"}), ("t.json:2", reason("d800"))]


def test_the_tokenizer_refuses_a_lone_surrogate_from_any_source(tokenizer):
    sample = Sample("api:1", "chat", (Message("user", "q"), Message("assistant", "a\ud800")))
    got = tokenize_sample(sample, tokenizer, max_seq_len=64, truncation="fail")
    assert got == RowProblem("api:1", "message 2 contains an unpaired surrogate \\ud800: not valid Unicode", "messages")


# ------------------------------------------------------------------------------------ the pipeline


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return ensure_tiny(Registry.load(get_settings().registry), MODEL, tmp_path_factory.mktemp("store"))


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return load_tokenizer(model_dir)


def recipe(path: str = "data") -> Recipe:
    data = {"path": path, "max_seq_len": 128, "bad_rows": {"policy": "fail"}}
    return Recipe.model_validate({"model": {"id": MODEL, "tiny": True}, "data": data})


def test_prepare_refuses_links_pipes_and_bad_unicode_with_located_issues(tmp_path, tokenizer, model_dir):
    bucket = tmp_path / "bucket"
    write(bucket / "data" / "a.jsonl", ("\n".join(GOOD) + "\n").encode())
    write(bucket / "data" / "u.jsonl", b'{"text": "fine"}\n{"text": "\\ud800"}\n')
    write(bucket / "elsewhere" / "b.jsonl", ("\n".join(GOOD[:3]) + "\n").encode())
    (bucket / "data" / "b.jsonl").symlink_to(bucket / "elsewhere" / "b.jsonl")
    (bucket / "data" / "p.jsonl").symlink_to("/etc/passwd")
    (bucket / "data" / "z.jsonl").symlink_to("/dev/zero")
    os.mkfifo(bucket / "data" / "f.jsonl")
    path, files = _local_files(Bucket.folder(bucket), "data", None)
    assert [name for name, _ in files] == ["a.jsonl", "u.jsonl"]  # only these are hashed for the cache key
    with pytest.raises(DataError) as err:
        prepare(recipe(), Bucket.folder(bucket), tokenizer, model_dir=model_dir, cache_dir=tmp_path / "cache")
    got = {(issue.file, issue.line, issue.path, issue.message) for issue in err.value.issues}
    assert {
        ("data/b.jsonl", None, "", LINK),
        ("data/f.jsonl", None, "", FIFO),
        ("data/p.jsonl", None, "", LINK),
        ("data/z.jsonl", None, "", LINK),
        ("data/u.jsonl", 2, "text", "contains an unpaired surrogate \\ud800: not valid Unicode"),
    } <= got
    assert not any(issue.file == "data/a.jsonl" for issue in err.value.issues)
    (bucket / "top.jsonl").symlink_to(bucket / "data" / "a.jsonl")
    with pytest.raises(DataError) as err:
        prepare(recipe("top.jsonl"), Bucket.folder(bucket), tokenizer)
    assert [(i.file, i.line, i.message) for i in err.value.issues] == [("top.jsonl", None, LINK)]


# ------------------------------------------------------------------------------------ fuzz

_PIECES = [
    *(b"{", b"}", b"[", b"]", b'"', b"\\", b"\\u", b"d800", b":", b",", b"\n", b"\r\n", b"\xef\xbb\xbf"),
    *(b'"text"', b"1", b"1e999", b"9" * 5000, b"null", b"\xff", b"\xe4\xb8\xad", b" ", b"\x00", b"a,b"),
]
_SUFFIXES = [".jsonl", ".jsonl.gz", ".json", ".csv", ".parquet"]
_SMALL = DataLimits(row_bytes=48, json_depth=3, json_file_bytes=512, inflated_bytes=4096, ratio_after_bytes=256)


_VALID = [
    ("\n".join(GOOD[:5]) + "\n").encode(),
    ("[" + ",\n".join(GOOD[:5]) + "]").encode(),
    b'prompt,chosen,rejected\n"multi\nline",yes,no\n"[{""a"": 1}]",x,y\n',
]


def _random_bytes(rng: random.Random) -> bytes:
    kind = rng.random()
    if kind < 0.2:
        return rng.randbytes(rng.randrange(0, 300))
    if kind < 0.4:  # a valid file with a few bytes changed
        data = bytearray(rng.choice(_VALID))
        for _ in range(rng.randrange(1, 6)):
            data[rng.randrange(len(data))] = rng.choice(b'{}[]",:\\\n\xff\x00a')
        return bytes(data)
    pieces = [rng.choice(_PIECES) for _ in range(rng.randrange(0, 80))]
    if kind < 0.6:  # structure repeated into deep nesting
        pieces.insert(rng.randrange(len(pieces) + 1), rng.choice([b"[", b'{"a":']) * rng.randrange(1, 2000))
    return b"".join(pieces)


@pytest.mark.parametrize("limits", [DEFAULT_DATA_LIMITS, _SMALL], ids=["default-limits", "small-limits"])
def test_fuzz_read_rows_never_raises_anything_but_the_engines_errors(tmp_path, limits):
    rng = random.Random(20261130)
    for n in range(1000):
        suffix = _SUFFIXES[n % len(_SUFFIXES)]
        data = _random_bytes(rng)
        if suffix == ".jsonl.gz" and rng.random() < 0.7:
            data = gzip.compress(data)
        path = write(tmp_path / f"f{n}{suffix}", data)
        try:
            got = list(read_rows(path, limits=limits))
        except FinetuneError:
            continue
        except Exception as exc:  # pragma: no cover - the failure message shows the input
            raise AssertionError(f"{type(exc).__name__}: {exc} reading {suffix} {data[:200]!r}") from exc
        for item in got:
            assert isinstance(item, Row | RowProblem)
            if isinstance(item, RowProblem):
                str(item).encode("utf-8")  # a reason never carries a lone surrogate
            else:
                json.dumps(item.record, ensure_ascii=False).encode("utf-8")
