"""Formats: detection, normalisation of every format, and every row problem with its exact wording."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from finetune.data.formats import DataFormatError, detect_format, required_columns, to_sample
from finetune.data.readers import read_rows
from finetune.data.types import Message, Row, RowProblem, Sample
from finetune.errors import FinetuneError
from finetune.recipe import DataFormat, FieldMapping

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "data"
FIELDS = FieldMapping()
CJK = "繁體中文 简体中文 🚀 mixed"


def row(record: dict[str, Any], where: str = "train.jsonl:7") -> Row:
    return Row(where, record)


def convert(record: dict[str, Any], fmt: DataFormat, system_prompt: str | None = None, **fields: str) -> Any:
    return to_sample(row(record), fmt, FieldMapping(**fields), system_prompt)


def problem(record: dict[str, Any], fmt: DataFormat, **fields: str) -> str:
    """``str()`` of the problem a row gives: ``file:line: field: reason``."""
    result = convert(record, fmt, **fields)
    assert isinstance(result, RowProblem), result
    return str(result)


def rows_in(path: Path) -> list[Row]:
    rows = list(read_rows(path))
    assert all(isinstance(item, Row) for item in rows)
    return [item for item in rows if isinstance(item, Row)]


def chat(*turns: tuple[str, str]) -> list[dict[str, str]]:
    return [{"role": role, "content": content} for role, content in turns]


U, A, S = "user", "assistant", "system"


# ------------------------------------------------------------------------------------ detection


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ({"messages": chat((U, "q"), (A, "a"))}, "messages"),
        ({"conversations": [{"from": "human", "value": "q"}]}, "sharegpt"),
        ({"instruction": "i", "input": "", "output": "o"}, "alpaca"),
        ({"prompt": "p", "chosen": "c", "rejected": "r"}, "preference"),
        ({"text": "t"}, "text"),
    ],
)
def test_detects_each_format(record, expected):
    fmt, explanation = detect_format([row(record)], FIELDS)
    assert fmt == expected
    assert explanation.startswith(f"{expected}: 1 of the first 1 rows have ")


def test_detection_explains_and_mentions_other_fits():
    rows = [row({"messages": chat((U, "q"), (A, "a")), "text": "q a"}) for _ in range(3)]
    rows.append(row({"text": "only text"}))
    assert detect_format(rows, FIELDS) == (
        "text",
        "text: 4 of the first 4 rows have 'text'; they also fit messages (set data.format to choose)",
    )
    assert detect_format(rows[:3], FIELDS) == (
        "messages",
        "messages: 3 of the first 3 rows have 'messages'; they also fit text (set data.format to choose)",
    )


def test_detection_looks_at_the_first_100_rows_only_and_ignores_empty_values():
    rows = [row({"instruction": "i", "output": "o", "text": ""}) for _ in range(100)]
    rows += [row({"text": "t"}) for _ in range(500)]
    assert detect_format(rows, FIELDS) == (
        "alpaca",
        "alpaca: 100 of the first 100 rows have 'instruction' and 'output'",
    )


def test_detection_uses_the_field_mapping():
    fields = FieldMapping(instruction="question", output="answer")
    assert detect_format([row({"question": "q", "answer": "a"})], fields)[0] == "alpaca"
    assert required_columns("preference", fields) == ("prompt", "chosen", "rejected")


def test_no_format_fits_names_the_columns_seen_and_needed():
    rows = [row({"question": "q", "answer": "a"}, "data/train.jsonl:1"), row({"id": 3}, "data/train.jsonl:2")]
    with pytest.raises(DataFormatError) as err:
        detect_format(rows, FIELDS)
    assert isinstance(err.value, FinetuneError)
    (issue,) = err.value.issues
    assert (issue.file, issue.line, issue.path) == ("data/train.jsonl", 1, "data.format")
    assert str(err.value) == (
        "cannot tell the data format\n"
        "  data/train.jsonl:1: data.format: "
        "no format fits the columns of the first 2 rows ('question', 'answer', 'id'); "
        "each format needs preference: 'prompt', 'chosen' and 'rejected'; messages: 'messages'; "
        "sharegpt: 'conversations'; alpaca: 'instruction' and 'output'; text: 'text' "
        "(hint: rename your columns, map them under data.fields, or set data.format)"
    )


def test_no_rows_cannot_be_detected():
    with pytest.raises(DataFormatError, match="no rows to detect the format from"):
        detect_format([], FIELDS)


def test_parquet_rows_are_located_as_files_without_lines():
    with pytest.raises(DataFormatError) as err:
        detect_format([row({"x": 1}, "t.parquet:row 1")], FIELDS)
    assert (err.value.issues[0].file, err.value.issues[0].line) == ("t.parquet:row 1", None)


# ------------------------------------------------------------------------------------ messages


def test_messages_round_trip_cjk_and_emoji_unchanged():
    sample = convert({"messages": chat((U, CJK), (A, f"  {CJK}\n"))}, "messages")
    assert sample == Sample(
        "train.jsonl:7", "chat", messages=(Message("user", CJK), Message("assistant", f"  {CJK}\n"))
    )


def test_messages_fixture_end_to_end():
    rows = [item for item in read_rows(FIXTURES / "chat.jsonl") if isinstance(item, Row)]
    fmt, _ = detect_format(rows, FIELDS)
    results = [to_sample(item, fmt, FIELDS, None) for item in rows]
    assert [str(result) for result in results if isinstance(result, RowProblem)] == [
        "chat.jsonl:4: messages: unknown role 'tool' in message 1"
    ]
    first = results[0]
    assert isinstance(first, Sample)
    assert [m.content for m in first.messages] == ["You answer briefly.", CJK, "好的 👍"]
    second = results[1]
    assert isinstance(second, Sample)
    assert second.messages[1] == Message("assistant", "Hello", 0)


def test_weights_roles_and_mapped_keys():
    record = {
        "dialog": [
            {"speaker": " User ", "text": "q", "weight": None},
            {"speaker": "ASSISTANT", "text": "a", "weight": 1.0, "name": "bot"},
        ]
    }
    sample = convert(record, "messages", messages="dialog", role="speaker", content="text")
    assert sample.messages == (Message("user", "q"), Message("assistant", "a", 1))


def test_system_prompt_precedence():
    own = {"messages": chat((S, "own"), (U, "q"), (A, "a")), "system": "column"}
    assert convert(own, "messages", "recipe").messages[0] == Message("system", "own")
    column = {"messages": chat((U, "q"), (A, "a")), "system": "column"}
    assert convert(column, "messages", "recipe").messages[0] == Message("system", "column")
    bare = {"messages": chat((U, "q"), (A, "a")), "system": "  "}
    assert convert(bare, "messages", "recipe").messages[0] == Message("system", "recipe")
    assert convert(bare, "messages", "   ").messages[0] == Message("user", "q")
    assert convert(bare, "messages").messages[0] == Message("user", "q")


def test_messages_as_json_text_in_a_csv_cell(tmp_path):
    path = tmp_path / "t.csv"
    cell = json.dumps(chat((U, CJK), (A, "ok")), ensure_ascii=False).replace('"', '""')
    path.write_text(f'messages\n"{cell}"\n"[{{""role"": ""user""]"\n', encoding="utf-8")
    rows = [item for item in read_rows(path) if isinstance(item, Row)]
    assert convert(rows[0].record, "messages").messages[0].content == CJK
    assert str(to_sample(rows[1], "messages", FIELDS, None)) == (
        "t.csv:3: messages: invalid JSON: Expecting ',' delimiter (column 17)"
    )


MESSAGE_PROBLEMS = [
    ({}, "messages: missing"),
    ({"messages": None}, "messages: missing"),
    ({"messages": "hello"}, "messages: expected a list of messages, got a string"),
    ({"messages": {"role": "user"}}, "messages: expected a list of messages, got an object"),
    ({"messages": []}, "messages: no messages"),
    ({"messages": "[]"}, "messages: no messages"),
    ({"messages": ["hi"]}, "messages: message 1 is not an object (got a string)"),
    ({"messages": [{"content": "q"}]}, "messages: message 1 has no 'role'"),
    ({"messages": chat((U, "q"), (A, "a"), ("tool", "{}"))}, "messages: unknown role 'tool' in message 3"),
    ({"messages": chat((U, "q"), ("function", "a"))}, "messages: unknown role 'function' in message 2"),
    ({"messages": [{"role": 3, "content": "q"}]}, "messages: unknown role 3 in message 1"),
    ({"messages": [{"role": "user"}]}, "messages: message 1 has no 'content'"),
    ({"messages": [{"role": "user", "content": ["q"]}]}, "messages: content of message 1 must be text, got a list"),
    ({"messages": chat((U, "q"), (A, " \n\t"))}, "messages: empty content in message 2"),
    (
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0.5}]},
        "messages: weight of message 2 must be 0 or 1, got 0.5",
    ),
    (
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": True}]},
        "messages: weight of message 2 must be 0 or 1, got true",
    ),
    (
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": "1"}]},
        'messages: weight of message 2 must be 0 or 1, got "1"',
    ),
    ({"messages": chat((U, "q"))}, "messages: no assistant turn"),
    ({"messages": chat((S, "s"))}, "messages: no assistant turn"),
    ({"messages": chat((U, "q"), (S, "s"), (A, "a"))}, "messages: system message must come first (message 2)"),
    (
        {"messages": chat((S, "s"), (A, "a"), (U, "q"), (A, "a"))},
        "messages: conversation must start with a user turn (message 2)",
    ),
    ({"messages": chat((U, "q"), (U, "q"), (A, "a"))}, "messages: user and assistant turns must alternate (message 2)"),
    ({"messages": chat((U, "q"), (A, "a"), (A, "a"))}, "messages: user and assistant turns must alternate (message 3)"),
    ({"messages": chat((U, "q"), (A, "a"), (U, "q"))}, "messages: ends with a user turn; nothing to learn after it"),
    ({"messages": chat((U, "q"), (A, "a")), "system": 5}, "system: expected text, got a number"),
]


@pytest.mark.parametrize(("record", "expected"), MESSAGE_PROBLEMS)
def test_message_problems(record, expected):
    assert problem(record, "messages") == f"train.jsonl:7: {expected}"


# ------------------------------------------------------------------------------------ sharegpt


def test_sharegpt_roles_are_mapped():
    turns = [("system", "s"), ("human", "q"), ("gpt", "a"), ("user", "q2"), ("model", CJK)]
    record = {"conversations": [{"from": who, "value": text} for who, text in turns]}
    sample = convert(record, "sharegpt")
    assert [(m.role, m.content) for m in sample.messages] == [(S, "s"), (U, "q"), (A, "a"), (U, "q2"), (A, CJK)]


def test_sharegpt_fixture_and_problems():
    results = [to_sample(item, "sharegpt", FIELDS, "be nice") for item in rows_in(FIXTURES / "sharegpt.jsonl")]
    assert isinstance(results[0], Sample)
    assert results[0].messages == (Message("system", "be nice"), Message("user", "2+2?"), Message("assistant", "4"))
    assert str(results[1]) == "sharegpt.jsonl:2: conversations: unknown role 'observation' in message 2"
    record = {"conversations": [{"from": "human", "text": "q"}]}
    assert problem(record, "sharegpt") == "train.jsonl:7: conversations: message 1 has no 'value'"
    assert problem({"chats": "x"}, "sharegpt", conversations="chats") == (
        "train.jsonl:7: chats: expected a list of messages, got a string"
    )


# ------------------------------------------------------------------------------------ alpaca


def test_alpaca_joins_instruction_and_input_with_a_blank_line():
    sample = convert({"instruction": CJK, "input": "🚀 input", "output": "out", "system": "sys"}, "alpaca", "recipe")
    assert sample == Sample(
        "train.jsonl:7",
        "chat",
        messages=(Message("system", "sys"), Message("user", f"{CJK}\n\n🚀 input"), Message("assistant", "out")),
    )
    bare = convert({"instruction": "do", "input": "  ", "output": "done"}, "alpaca")
    assert bare.messages == (Message("user", "do"), Message("assistant", "done"))


def test_alpaca_fixture_with_field_mapping():
    first, second, third = [to_sample(item, "alpaca", FIELDS, None) for item in rows_in(FIXTURES / "alpaca.json")]
    assert isinstance(first, Sample) and isinstance(second, Sample)
    assert first.messages[0] == Message("user", "Translate to French\n\ncat")
    assert second.messages == (Message("user", "Say hi"), Message("assistant", "hi"))
    assert str(third) == "alpaca.json:8: output: empty"
    mapped = convert({"question": "q", "answer": "a"}, "alpaca", instruction="question", output="answer")
    assert mapped.messages == (Message("user", "q"), Message("assistant", "a"))


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ({"output": "o"}, "instruction: missing"),
        ({"instruction": "i"}, "output: missing"),
        ({"instruction": "", "output": "o"}, "instruction: empty"),
        ({"instruction": "i", "output": 42}, "output: expected text, got a number"),
        ({"instruction": "i", "input": ["x"], "output": "o"}, "input: expected text, got a list"),
    ],
)
def test_alpaca_problems(record, expected):
    assert problem(record, "alpaca") == f"train.jsonl:7: {expected}"


# ------------------------------------------------------------------------------------ text


def test_text_is_kept_exactly():
    assert convert({"text": f"\n{CJK}  "}, "text") == Sample("train.jsonl:7", "text", text=f"\n{CJK}  ")
    assert convert({"body": "b"}, "text", text="body").text == "b"


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ({}, "text: missing"),
        ({"text": " \n"}, "text: empty"),
        ({"text": {"a": 1}}, "text: expected text, got an object"),
    ],
)
def test_text_problems(record, expected):
    assert problem(record, "text") == f"train.jsonl:7: {expected}"


# ------------------------------------------------------------------------------------ preference


def test_preference_with_text_and_message_lists():
    sample = convert({"prompt": CJK, "chosen": "good", "rejected": "bad"}, "preference", "sys")
    assert sample == Sample(
        "train.jsonl:7",
        "preference",
        messages=(Message("system", "sys"), Message("user", CJK)),
        chosen="good",
        rejected="bad",
    )
    record = {
        "prompt": chat((U, "q"), (A, "a"), (U, "[INST] more")),
        "chosen": chat((A, "yes")),
        "rejected": json.dumps(chat((A, "no"))),
    }
    sample = convert(record, "preference")
    assert [m.role for m in sample.messages] == [U, A, U]
    assert (sample.chosen, sample.rejected) == ("yes", "no")


def test_preference_text_that_looks_like_json_stays_text():
    sample = convert({"prompt": "[INST] hi", "chosen": "[1, 2]", "rejected": "[]"}, "preference")
    assert (sample.messages[0].content, sample.chosen, sample.rejected) == ("[INST] hi", "[1, 2]", "[]")


def test_preference_csv_fixture():
    results = [to_sample(item, "preference", FIELDS, None) for item in rows_in(FIXTURES / "prefs.csv")]
    assert isinstance(results[0], Sample)
    assert results[0].chosen == "An old silent pond\na frog jumps in"
    assert str(results[1]) == "prefs.csv:4: rejected: identical to chosen"


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ({"chosen": "c", "rejected": "r"}, "prompt: missing"),
        ({"prompt": "p", "chosen": " ", "rejected": "r"}, "chosen: empty"),
        ({"prompt": "p", "chosen": "c"}, "rejected: missing"),
        ({"prompt": "p", "chosen": "same ", "rejected": "same"}, "rejected: identical to chosen"),
        ({"prompt": 1, "chosen": "c", "rejected": "r"}, "prompt: expected text, got a number"),
        ({"prompt": [], "chosen": "c", "rejected": "r"}, "prompt: no messages"),
        (
            {"prompt": chat((U, "q"), (A, "a")), "chosen": "c", "rejected": "r"},
            "prompt: prompt must end with a user turn (message 2)",
        ),
        ({"prompt": chat((S, "s")), "chosen": "c", "rejected": "r"}, "prompt: no user turn"),
        (
            {"prompt": chat((U, "q"), (U, "q")), "chosen": "c", "rejected": "r"},
            "prompt: user and assistant turns must alternate (message 2)",
        ),
        (
            {"prompt": "p", "chosen": chat((U, "q"), (A, "a")), "rejected": "r"},
            "chosen: expected text or a list with one assistant message, got 2 messages",
        ),
        (
            {"prompt": "p", "chosen": "c", "rejected": chat((U, "r"))},
            "rejected: expected an assistant message, got role 'user'",
        ),
        ({"prompt": "p", "chosen": [{"role": "assistant"}], "rejected": "r"}, "chosen: message 1 has no 'content'"),
    ],
)
def test_preference_problems(record, expected):
    assert problem(record, "preference") == f"train.jsonl:7: {expected}"


def test_auto_is_not_a_format_for_a_row():
    with pytest.raises(ValueError, match="detect_format"):
        to_sample(row({"text": "t"}), "auto", FIELDS, None)
