"""Property-based fuzzing of the parsers tenants can reach: no input gives a traceback.

The recipe loader, the dataset readers, the safetensors header parser and the archive manifest
parser each take bytes a hostile tenant chose. Whatever hypothesis generates, each must answer
with its own located problems (or the engine's typed errors), never an unexpected exception.
The examples are derandomised and bounded, so CI runs the same inputs in a few seconds.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from finetune.archive.manifest import read_manifest
from finetune.data.readers import read_rows
from finetune.data.types import Row, RowProblem
from finetune.errors import FinetuneError, Issue
from finetune.safetensors_header import read_header_bytes
from finetune.signing import SigningKey, sign_document
from finetune.yamlio import parse_yaml_located

BOUNDED = settings(
    max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
KEY = SigningKey.generate()

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=30,
)

yaml_words = st.sampled_from(
    ["model:", "  id: x", "data:", "- a", "&a [1, 2]", "*a", "!!python/object:os.system", "? [1]", ": ", "{", "}",
     "[", "]", "'", '"', "\t", "---", "...", "%YAML 1.1", "9" * 40, "2024-13-45", "\ud800", "\x00", "#", "|", ">"]
)  # fmt: skip


@BOUNDED
@given(st.one_of(st.text(max_size=400), st.lists(yaml_words, max_size=40).map("\n".join)))
def test_the_recipe_loader_never_raises(text: str) -> None:
    doc = parse_yaml_located(text, "fuzz.yaml")
    assert all(isinstance(issue, Issue) for issue in doc.issues)


@BOUNDED
@given(
    st.sampled_from([".jsonl", ".json", ".csv"]),
    st.one_of(
        st.binary(max_size=600),
        st.lists(json_values, max_size=6).map(lambda rows: "\n".join(json.dumps(r) for r in rows).encode()),
    ),
)
def test_the_dataset_readers_never_raise(tmp_path_factory, suffix: str, data: bytes) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path_factory.mktemp("fuzz") / f"rows{suffix}"
    path.write_bytes(data)
    try:
        items = list(read_rows(path, path.name))
    except FinetuneError:
        return  # the engine's own, typed refusal
    assert all(isinstance(item, Row | RowProblem) for item in items)


def _safetensors(header: object, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


tensor_entries = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(["F32", "BF16", "I64", "X9", ""]),
        "shape": st.lists(st.integers(min_value=-2, max_value=10**6), max_size=3),
        "data_offsets": st.lists(st.integers(min_value=-5, max_value=10**16), min_size=0, max_size=3),
    }
)


@BOUNDED
@given(
    st.one_of(
        st.binary(max_size=300),
        st.builds(_safetensors, st.dictionaries(st.text(max_size=8), tensor_entries | json_values, max_size=4),
                  st.binary(max_size=64)),
        st.builds(lambda n, rest: struct.pack("<Q", n) + rest, st.integers(0, 2**64 - 1), st.binary(max_size=64)),
    )
)  # fmt: skip
def test_the_safetensors_header_parser_never_raises(blob: bytes) -> None:
    summary, issues = read_header_bytes(blob, "model.safetensors")
    assert (summary is None) == bool(issues)
    assert all(isinstance(issue, Issue) and issue.file for issue in issues)


manifest_like = st.fixed_dictionaries(
    {"format": st.sampled_from(["finetune-model-archive", "other"]), "format_version": json_values},
    optional={
        "files": st.dictionaries(st.text(max_size=30), json_values, max_size=4),
        "verification": json_values,
        "stop_token_ids": json_values,
        "contents": json_values,
        "base_model": json_values,
        "weights_dtype": json_values,
    },
)


@BOUNDED
@given(st.one_of(st.binary(max_size=400), manifest_like.map(lambda m: json.dumps(m).encode())), st.booleans())
def test_the_archive_manifest_parser_never_raises(data: bytes, signed: bool) -> None:
    if signed and data.startswith(b"{"):
        try:
            data = json.dumps(sign_document(json.loads(data), KEY)).encode()
        except ValueError:
            pass
    result = read_manifest(data, KEY.public)
    assert result.manifest is None or not result.problems  # trusted only when nothing is wrong
    assert all(isinstance(problem, str) for problem in result.problems)


def test_the_fuzz_tests_reach_the_parsers(tmp_path: Path) -> None:
    """The properties above are not vacuous: each parser accepts a sound input."""
    good = tmp_path / "ok.jsonl"
    good.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    assert [type(item) for item in read_rows(good, good.name)] == [Row]
    summary, issues = read_header_bytes(_safetensors({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}},
                                                     b"\0" * 8), "m.safetensors")  # fmt: skip
    assert summary is not None and not issues
    assert not parse_yaml_located("model:\n  id: x\n", "ok.yaml").issues
