"""Recognise a dataset's layout and normalise each row into a :class:`Sample`, or say why it cannot be used.

Formats: ``messages`` (a list of ``{role, content}``), ``sharegpt`` (``conversations``, a list of
``{from, value}``), ``alpaca`` (``instruction``, optional ``input``, ``output``), ``preference``
(``prompt``, ``chosen``, ``rejected``) and ``text``. Column names come from the recipe's
:class:`~finetune.recipe.FieldMapping`.

Conversation rules, chosen so every approved chat template renders the conversation and so
every row has something to learn:

* roles are ``system``, ``user`` and ``assistant`` (compared without case or surrounding spaces);
  anything else (``tool``, ``function``) is a problem;
* a system message may only come first; after it the turns start with the user and alternate
  user, assistant, user... (many templates refuse anything else);
* there is at least one assistant turn, and the conversation does not end with a user turn
  (nothing after it could be learned);
* a message's optional ``weight`` is 0 or 1; every ``content`` is non-empty text.

The system prompt is the conversation's own system message, else the row's system column, else
the recipe's ``system_prompt``. Text is kept exactly as given: it is only stripped to check that
it is not empty, never normalised. A list column may also hold the list as JSON text (CSV cells).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from finetune.data.readers import describe_type, json_error_reason
from finetune.data.types import Message, Role, Row, RowProblem, Sample
from finetune.errors import Issue, IssuesError
from finetune.recipe import DataFormat, FieldMapping

#: Rows :func:`detect_format` looks at.
DETECT_ROWS = 100
#: Detection order; on a tie the earlier (more specific) format wins.
_FORMATS: tuple[DataFormat, ...] = ("preference", "messages", "sharegpt", "alpaca", "text")
_ROLES: Mapping[str, Role] = {"system": "system", "user": "user", "assistant": "assistant"}
_SHAREGPT_ROLES: Mapping[str, Role] = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
}
_SHAREGPT_ROLE_KEY, _SHAREGPT_CONTENT_KEY = "from", "value"
_WEIGHT_KEY = "weight"


class DataFormatError(IssuesError):
    """No data format fits the dataset's columns."""


class _RowError(Exception):
    """A row cannot be used: raised deep inside a format, turned into a :class:`RowProblem`."""

    def __init__(self, field: str | None, reason: str) -> None:
        super().__init__(reason)
        self.field, self.reason = field, reason


def required_columns(fmt: DataFormat, fields: FieldMapping) -> tuple[str, ...]:
    """The columns a format needs in every row, under the recipe's column names."""
    return {
        "messages": (fields.messages,),
        "sharegpt": (fields.conversations,),
        "alpaca": (fields.instruction, fields.output),
        "preference": (fields.prompt, fields.chosen, fields.rejected),
        "text": (fields.text,),
        "auto": (),
    }[fmt]


def detect_format(rows: Sequence[Row], fields: FieldMapping) -> tuple[DataFormat, str]:
    """Decide from the first rows which format their columns fit.

    The format whose columns are present (and not empty) in the most of the first
    :data:`DETECT_ROWS` rows wins; ties go to the more specific format, in the order preference,
    messages, sharegpt, alpaca, text.

    Args:
        rows: Rows in file order; only the first :data:`DETECT_ROWS` are looked at.
        fields: The recipe's column names.

    Returns:
        The format and a sentence explaining the choice, for the job log.

    Raises:
        DataFormatError: When there are no rows, or no format's columns are in any of them. The
            message names the columns seen and the columns each format needs.
    """
    head = list(rows[:DETECT_ROWS])
    if not head:
        raise DataFormatError([Issue("data.format", "no rows to detect the format from")], "no data")
    counts = {fmt: sum(_fits(row, required_columns(fmt, fields)) for row in head) for fmt in _FORMATS}
    best = max(_FORMATS, key=lambda fmt: counts[fmt])  # max keeps the first of equals: the priority order
    if counts[best] == 0:
        raise _no_format_error(head, fields)
    explanation = f"{best}: {counts[best]} of the first {len(head)} rows have {_quoted(required_columns(best, fields))}"
    others = [fmt for fmt in _FORMATS if fmt != best and counts[fmt]]
    if others:
        explanation += f"; they also fit {', '.join(others)} (set data.format to choose)"
    return best, explanation


def _present(record: Mapping[str, Any], column: str) -> bool:
    value = record.get(column)
    return value is not None and not (isinstance(value, str) and not value.strip())


def _fits(row: Row, columns: tuple[str, ...]) -> bool:
    return all(_present(row.record, column) for column in columns)


def _quoted(columns: Sequence[str]) -> str:
    names = [f"'{column}'" for column in columns]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def _no_format_error(head: list[Row], fields: FieldMapping) -> DataFormatError:
    seen = list(dict.fromkeys(column for row in head for column in row.record))
    shown = ", ".join(f"'{column}'" for column in seen[:20]) + (f" and {len(seen) - 20} more" if len(seen) > 20 else "")
    needs = "; ".join(f"{fmt}: {_quoted(required_columns(fmt, fields))}" for fmt in _FORMATS)
    file, _, line = head[0].where.rpartition(":")
    issue = Issue(
        "data.format",
        f"no format fits the columns of the first {len(head)} rows ({shown or 'none'}); each format needs {needs}",
        file=file if line.isdigit() else head[0].where,
        line=int(line) if line.isdigit() else None,
        hint="rename your columns, map them under data.fields, or set data.format",
    )
    return DataFormatError([issue], "cannot tell the data format")


def to_sample(row: Row, fmt: DataFormat, fields: FieldMapping, system_prompt: str | None) -> Sample | RowProblem:
    """Normalise one row of a known format into a sample, or a located problem.

    Args:
        row: The row as read.
        fmt: Its format (from the recipe, or :func:`detect_format`); never ``"auto"``.
        fields: The recipe's column names.
        system_prompt: The recipe's system prompt, used by conversations that have none.

    Returns:
        A :class:`Sample`, or a :class:`RowProblem` naming the column and what is wrong
        (message numbers are 1-based).

    Raises:
        ValueError: When ``fmt`` is ``"auto"``: detect the format first.
    """
    if fmt == "auto":
        raise ValueError("to_sample needs a concrete format: call detect_format first")
    build = _BUILDERS[fmt]
    try:
        return build(row, fields, system_prompt)
    except _RowError as err:
        return RowProblem(row.where, err.reason, err.field)


# ------------------------------------------------------------------------------------ values


def _text(record: Mapping[str, Any], column: str, *, optional: bool = False) -> str | None:
    """The column's text; ``None`` for an optional column that is missing or blank."""
    value = record.get(column)
    if value is None:
        if optional:
            return None
        raise _RowError(column, "missing")
    if not isinstance(value, str):
        raise _RowError(column, f"expected text, got {describe_type(value)}")
    if not value.strip():
        if optional:
            return None
        raise _RowError(column, "empty")
    return value


def _required_text(record: Mapping[str, Any], column: str) -> str:
    text = _text(record, column)
    assert text is not None  # _text raises for a required column
    return text


def _message_list(record: Mapping[str, Any], column: str) -> list[Any]:
    """A list column's value, parsing JSON text (a CSV cell) that starts with ``[``."""
    value = record.get(column)
    if value is None:
        raise _RowError(column, "missing")
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise _RowError(column, json_error_reason(exc)) from None
    if not isinstance(value, list | tuple):
        raise _RowError(column, f"expected a list of messages, got {describe_type(value)}")
    if not value:
        raise _RowError(column, "no messages")
    return list(value)


def _maybe_messages(value: Any) -> Any:
    """JSON text holding a list of objects, parsed; any other value unchanged (a prompt may start with ``[``)."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            return value
        if isinstance(parsed, list) and parsed and all(isinstance(item, dict) for item in parsed):
            return parsed
    return value


def _weight(value: Any, index: int, column: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool) and value in (0, 1):
        return int(value)
    raise _RowError(column, f"weight of message {index} must be 0 or 1, got {json.dumps(value, default=str)}")


def _messages(
    items: list[Any], column: str, role_key: str, content_key: str, roles: Mapping[str, Role]
) -> list[Message]:
    """Parse message objects; roles are mapped through ``roles`` (case and spaces ignored)."""
    messages = []
    for index, item in enumerate(items, 1):
        if not isinstance(item, dict):
            raise _RowError(column, f"message {index} is not an object (got {describe_type(item)})")
        raw_role = item.get(role_key)
        if raw_role is None:
            raise _RowError(column, f"message {index} has no '{role_key}'")
        role = roles.get(raw_role.strip().lower()) if isinstance(raw_role, str) else None
        if role is None:
            raise _RowError(column, f"unknown role {raw_role!r} in message {index}")
        content = item.get(content_key)
        if content is None:
            raise _RowError(column, f"message {index} has no '{content_key}'")
        if not isinstance(content, str):
            raise _RowError(column, f"content of message {index} must be text, got {describe_type(content)}")
        if not content.strip():
            raise _RowError(column, f"empty content in message {index}")
        messages.append(Message(role, content, _weight(item.get(_WEIGHT_KEY), index, column)))
    return messages


def _check_turns(messages: list[Message], column: str, *, prompt: bool = False) -> None:
    """Enforce the conversation rules; a ``prompt`` needs no assistant turn and must end with the user."""
    for index, message in enumerate(messages[1:], 2):
        if message.role == "system":
            raise _RowError(column, f"system message must come first (message {index})")
    if not prompt and not any(message.role == "assistant" for message in messages):
        raise _RowError(column, "no assistant turn")
    turns = [(index, message.role) for index, message in enumerate(messages, 1) if message.role != "system"]
    if not turns:
        raise _RowError(column, "no user turn")
    expected = "user"
    for position, (index, role) in enumerate(turns):
        if role != expected:
            if position == 0:
                raise _RowError(column, f"conversation must start with a user turn (message {index})")
            raise _RowError(column, f"user and assistant turns must alternate (message {index})")
        expected = "assistant" if role == "user" else "user"
    last_index, last_role = turns[-1]
    if prompt and last_role != "user":
        raise _RowError(column, f"prompt must end with a user turn (message {last_index})")
    if not prompt and last_role == "user":
        raise _RowError(column, "ends with a user turn; nothing to learn after it")


def _with_system(
    messages: list[Message], record: Mapping[str, Any], fields: FieldMapping, system_prompt: str | None
) -> tuple[Message, ...]:
    """Prepend the row's system column, else the recipe's prompt, to a conversation without a system message."""
    if messages and messages[0].role == "system":
        return tuple(messages)
    system = _text(record, fields.system, optional=True)
    if system is None and system_prompt and system_prompt.strip():
        system = system_prompt
    return tuple([Message("system", system), *messages] if system is not None else messages)


# ------------------------------------------------------------------------------------ formats


def _chat(row: Row, fields: FieldMapping, system_prompt: str | None) -> Sample:
    items = _message_list(row.record, fields.messages)
    messages = _messages(items, fields.messages, fields.role, fields.content, _ROLES)
    _check_turns(messages, fields.messages)
    return Sample(row.where, "chat", messages=_with_system(messages, row.record, fields, system_prompt))


def _sharegpt(row: Row, fields: FieldMapping, system_prompt: str | None) -> Sample:
    column = fields.conversations
    items = _message_list(row.record, column)
    messages = _messages(items, column, _SHAREGPT_ROLE_KEY, _SHAREGPT_CONTENT_KEY, _SHAREGPT_ROLES)
    _check_turns(messages, column)
    return Sample(row.where, "chat", messages=_with_system(messages, row.record, fields, system_prompt))


def _alpaca(row: Row, fields: FieldMapping, system_prompt: str | None) -> Sample:
    instruction = _required_text(row.record, fields.instruction)
    extra = _text(row.record, fields.input, optional=True)
    output = _required_text(row.record, fields.output)
    user = Message("user", f"{instruction}\n\n{extra}" if extra is not None else instruction)
    messages = [user, Message("assistant", output)]
    return Sample(row.where, "chat", messages=_with_system(messages, row.record, fields, system_prompt))


def _text_sample(row: Row, fields: FieldMapping, system_prompt: str | None) -> Sample:
    return Sample(row.where, "text", text=_required_text(row.record, fields.text))


def _answer(record: Mapping[str, Any], column: str, fields: FieldMapping) -> str:
    """A preference answer: text, or a list holding one assistant message."""
    value = _maybe_messages(record.get(column))
    if not isinstance(value, list | tuple):
        return _required_text({column: value}, column)
    if len(value) != 1:
        raise _RowError(column, f"expected text or a list with one assistant message, got {len(value)} messages")
    (message,) = _messages(list(value), column, fields.role, fields.content, _ROLES)
    if message.role != "assistant":
        raise _RowError(column, f"expected an assistant message, got role '{message.role}'")
    return message.content


def _preference(row: Row, fields: FieldMapping, system_prompt: str | None) -> Sample:
    column = fields.prompt
    value = _maybe_messages(row.record.get(column))
    if isinstance(value, list | tuple):
        prompt = _messages(_message_list({column: value}, column), column, fields.role, fields.content, _ROLES)
        _check_turns(prompt, column, prompt=True)
    else:
        prompt = [Message("user", _required_text({column: value}, column))]
    chosen = _answer(row.record, fields.chosen, fields)
    rejected = _answer(row.record, fields.rejected, fields)
    if chosen.strip() == rejected.strip():
        raise _RowError(fields.rejected, "identical to chosen")
    messages = _with_system(prompt, row.record, fields, system_prompt)
    return Sample(row.where, "preference", messages=messages, chosen=chosen, rejected=rejected)


_BUILDERS: dict[str, Callable[[Row, FieldMapping, str | None], Sample]] = {
    "messages": _chat,
    "sharegpt": _sharegpt,
    "alpaca": _alpaca,
    "text": _text_sample,
    "preference": _preference,
}
