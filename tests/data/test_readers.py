"""Readers: every file kind gives located rows, and every bad record a located problem with its exact reason."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from finetune.data.readers import SUPPORTED_SUFFIXES, DataReadError, read_rows
from finetune.data.types import Row, RowProblem

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "data"
BOM = b"\xef\xbb\xbf"


def items(path: Path, display_name: str | None = None) -> list[tuple[str, object]]:
    """(where, record or problem text) for everything read, for one-line comparisons."""
    out: list[tuple[str, object]] = []
    for item in read_rows(path, display_name):
        out.append((item.where, item.record) if isinstance(item, Row) else (item.where, item.reason))
    return out


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# ------------------------------------------------------------------------------------ JSONL


def test_jsonl_fixture_skips_blank_lines_and_keeps_line_numbers():
    got = list(read_rows(FIXTURES / "chat.jsonl"))
    assert [item.where for item in got] == ["chat.jsonl:1", "chat.jsonl:2", "chat.jsonl:4"]
    assert all(isinstance(item, Row) for item in got)
    first = got[0]
    assert isinstance(first, Row)
    assert first.record["messages"][1]["content"] == "繁體中文 简体中文 🚀 mixed"


def test_jsonl_with_bom_and_crlf(tmp_path):
    path = write(tmp_path, "train.jsonl", BOM + b'{"text": "a"}\r\n\r\n{"text": "b\\r\\n"}\r\n')
    assert items(path, "data/train.jsonl") == [
        ("data/train.jsonl:1", {"text": "a"}),
        ("data/train.jsonl:3", {"text": "b\r\n"}),
    ]


def test_jsonl_bad_lines_are_located_problems_and_reading_goes_on(tmp_path):
    data = (
        b'{"text": "ok"}\n'
        b'{"text": "caf\xe9"}\n'  # Latin-1, not UTF-8
        b'{"text": "a" "b"}\n'
        b"[1, 2]\n"
        b'"just a string"\n'
        b"   \n"
        b'{"text": "last"}\n'
    )
    assert items(write(tmp_path, "t.jsonl", data)) == [
        ("t.jsonl:1", {"text": "ok"}),
        ("t.jsonl:2", "invalid UTF-8: byte 0xe9 at column 14"),
        ("t.jsonl:3", "invalid JSON: Expecting ',' delimiter (column 14)"),
        ("t.jsonl:4", "expected a JSON object, got a list"),
        ("t.jsonl:5", "expected a JSON object, got a string"),
        ("t.jsonl:7", {"text": "last"}),
    ]


def test_jsonl_utf8_column_counts_characters_not_bytes(tmp_path):
    path = write(tmp_path, "t.jsonl", '{"text": "中文'.encode() + b'\xff"}\n')
    assert items(path) == [("t.jsonl:1", "invalid UTF-8: byte 0xff at column 13")]


def test_gzipped_jsonl(tmp_path):
    path = tmp_path / "t.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"text": "a"}\n{"text": "b"}\n'))
    assert items(path) == [("t.jsonl.gz:1", {"text": "a"}), ("t.jsonl.gz:2", {"text": "b"})]


def test_truncated_gzip_is_a_problem_not_a_crash(tmp_path):
    data = gzip.compress(b"".join(b'{"text": "%d"}\n' % i for i in range(2000)))
    got = items(write(tmp_path, "t.jsonl.gz", data[: len(data) // 2]))
    where, reason = got[-1]
    assert isinstance(reason, str) and reason.startswith("cannot decompress: ")
    assert reason.endswith("; the rest of the file cannot be read")
    assert where == f"t.jsonl.gz:{len(got)}"


# ------------------------------------------------------------------------------------ JSON


def test_json_array_rows_are_located_where_each_element_starts():
    got = items(FIXTURES / "alpaca.json")
    assert [where for where, _ in got] == ["alpaca.json:2", "alpaca.json:7", "alpaca.json:8"]
    assert got[0][1] == {"instruction": "Translate to French", "input": "cat", "output": "chat"}


def test_json_array_with_bom_crlf_and_bad_elements(tmp_path):
    data = BOM + b'[\r\n  {"a": 1},\r\n  3,\r\n\r\n  {"a":\r\n 2}, []\r\n]\r\n'
    assert items(write(tmp_path, "t.json", data)) == [
        ("t.json:2", {"a": 1}),
        ("t.json:3", "expected a JSON object, got a number"),
        ("t.json:5", {"a": 2}),
        ("t.json:6", "expected a JSON object, got a list"),
    ]


REST = "; the rest of the file cannot be read"
NOT_ARRAY = "expected a JSON array of objects at the top level, got"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            b'[{"a": 1}\n {"a": 2}]',
            [("t.json:1", {"a": 1}), ("t.json:2", f"invalid JSON: Expecting ',' delimiter (column 2){REST}")],
        ),
        (
            b'[{"a": 1},\n {"a": }]',
            [("t.json:1", {"a": 1}), ("t.json:2", f"invalid JSON: Expecting value (column 8){REST}")],
        ),
        (b'[{"a": 1}] x', [("t.json:1", {"a": 1}), ("t.json:1", "invalid JSON: Extra data (column 12)")]),
        (b'{"data": [1, 2]}', [("t.json:1", f"{NOT_ARRAY} an object")]),
        (b'\n\n"text"', [("t.json:3", f"{NOT_ARRAY} a string")]),
        (
            b'[{"a": 1},\n{"a": "\xff"}]',
            [("t.json:2", "invalid UTF-8: byte 0xff at column 8; the file cannot be read")],
        ),
        (b"", []),
        (b"[]", []),
    ],
    ids=["missing-comma", "broken-element", "extra-data", "object", "string", "bad-utf8", "empty", "empty-array"],
)
def test_json_file_problems(tmp_path, data, expected):
    assert items(write(tmp_path, "t.json", data)) == expected


def test_json_lines_under_a_json_name_are_read_as_json_lines(tmp_path):
    path = write(tmp_path, "t.json", b'{"a": 1}\n\n{"a": 2}\nnope\n')
    assert items(path) == [
        ("t.json:1", {"a": 1}),
        ("t.json:3", {"a": 2}),
        ("t.json:4", "invalid JSON: Expecting value (column 1)"),
    ]


# ------------------------------------------------------------------------------------ CSV


def test_csv_quoted_multiline_field_is_located_at_its_first_line():
    assert items(FIXTURES / "prefs.csv") == [
        ("prefs.csv:2", {"prompt": "Write a haiku", "chosen": "An old silent pond\na frog jumps in", "rejected": "no"}),
        ("prefs.csv:4", {"prompt": 'Say "yes"', "chosen": "yes", "rejected": "yes"}),
    ]


def test_csv_with_bom_crlf_blank_lines_and_bad_rows(tmp_path):
    data = (
        BOM + b'text,label\r\n"one\r\ntwo",a\r\n\r\nx,y,z\r\nonly\r\ncaf\xe9,b\r\n"multi\r\nline \xff",c\r\nfine,d\r\n'
    )
    assert items(write(tmp_path, "t.csv", data)) == [
        ("t.csv:2", {"text": "one\r\ntwo", "label": "a"}),
        ("t.csv:5", "expected 2 fields as in the header, got 3"),
        ("t.csv:6", "expected 2 fields as in the header, got 1"),
        ("t.csv:7", "invalid UTF-8: byte 0xe9 at column 4"),
        ("t.csv:9", "invalid UTF-8: byte 0xff at column 6"),
        ("t.csv:10", {"text": "fine", "label": "d"}),
    ]


def test_csv_values_stay_strings_and_json_text_is_not_parsed(tmp_path):
    data = b'messages,n\n"[{""role"": ""user""}]",3\n'
    assert items(write(tmp_path, "t.csv", data)) == [("t.csv:2", {"messages": '[{"role": "user"}]', "n": "3"})]


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"a,a\n1,2\n", [("t.csv:1", "column 'a' appears twice in the header; the file cannot be read")]),
        (b"a,\xff\n1,2\n", [("t.csv:1", "invalid UTF-8: byte 0xff at column 3; the header cannot be read")]),
        (b"", []),
        (b"a,b\n", []),
    ],
    ids=["duplicate-column", "bad-header", "empty", "header-only"],
)
def test_csv_file_problems(tmp_path, data, expected):
    assert items(write(tmp_path, "t.csv", data)) == expected


def test_csv_long_cells_are_read(tmp_path):
    long = "x" * 300_000  # over the csv module's default 128 KiB field limit
    path = write(tmp_path, "t.csv", f"text\n{long}\n".encode())
    assert items(path) == [("t.csv:2", {"text": long})]


# ------------------------------------------------------------------------------------ Parquet


def test_parquet_rows_are_numbered_across_batches(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    messages = [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "🚀"}] for i in range(2500)]
    pq.write_table(pa.table({"messages": messages}), tmp_path / "t.parquet", row_group_size=1000)
    got = list(read_rows(tmp_path / "t.parquet", "data/t.parquet"))
    assert len(got) == 2500
    assert [got[0].where, got[1024].where, got[-1].where] == [
        "data/t.parquet:row 1",
        "data/t.parquet:row 1025",
        "data/t.parquet:row 2500",
    ]
    last = got[-1]
    assert isinstance(last, Row)
    assert last.record == {"messages": [{"role": "user", "content": "q2499"}, {"role": "assistant", "content": "🚀"}]}


def test_unreadable_parquet_is_one_problem(tmp_path):
    got = list(read_rows(write(tmp_path, "t.parquet", b"not parquet at all")))
    assert len(got) == 1 and isinstance(got[0], RowProblem)
    assert got[0].where == "t.parquet"
    assert got[0].reason.startswith("not a readable Parquet file: ")


# ------------------------------------------------------------------------------------ folders and errors


def test_folder_reads_every_file_sorted_with_relative_names(tmp_path):
    write(tmp_path, "data/b.jsonl", b'{"n": "b"}\n')
    write(tmp_path, "data/a/z.csv", b"n\nz\n")
    write(tmp_path, "data/a.json", b'[{"n": "a"}]')
    write(tmp_path, "data/_SUCCESS", b"")
    write(tmp_path, "data/.hidden/x.txt", b"")
    assert items(tmp_path / "data", "bucket/data/") == [
        ("bucket/data/a/z.csv:2", {"n": "z"}),
        ("bucket/data/a.json:1", {"n": "a"}),
        ("bucket/data/b.jsonl:1", {"n": "b"}),
    ]
    assert [where for where, _ in items(tmp_path / "data")] == ["data/a/z.csv:2", "data/a.json:1", "data/b.jsonl:1"]


def test_folder_with_an_unsupported_file_is_refused_before_reading(tmp_path):
    write(tmp_path, "data/a.jsonl", b'{"n": 1}\n')
    write(tmp_path, "data/notes.txt", b"hello")
    with pytest.raises(DataReadError) as err:
        read_rows(tmp_path / "data")
    supported = ".jsonl, .jsonl.gz, .json, .csv, .parquet"
    assert str(err.value) == f"data/notes.txt: unsupported file type; supported: {supported}"


def test_unsupported_and_missing_files_raise(tmp_path):
    with pytest.raises(DataReadError, match=r"^t\.xlsx: unsupported file type; supported: \.jsonl, "):
        read_rows(write(tmp_path, "t.xlsx", b""))
    with pytest.raises(DataReadError, match=r"^data/missing\.jsonl: not found$"):
        read_rows(tmp_path / "missing.jsonl", "data/missing.jsonl")


def test_suffixes_are_case_insensitive(tmp_path):
    assert items(write(tmp_path, "T.JSONL", b'{"a": 1}\n')) == [("T.JSONL:1", {"a": 1})]
    assert set(SUPPORTED_SUFFIXES) == {".jsonl", ".jsonl.gz", ".json", ".csv", ".parquet"}


def test_row_problem_str_is_file_line_field_reason():
    problem = RowProblem("train.jsonl:17", "no assistant turn", "messages")
    assert str(problem) == "train.jsonl:17: messages: no assistant turn"
    assert str(RowProblem("train.jsonl:3", "expected a JSON object, got a list")) == (
        "train.jsonl:3: expected a JSON object, got a list"
    )
