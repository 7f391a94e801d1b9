"""YAML documents that remember where each value came from, and pydantic errors told plainly.

Tenants write recipes by hand or get them from a form; either way an error must point at the
line. :func:`load_yaml_located` parses YAML into plain data plus a map from field path to line,
refuses duplicate keys (YAML silently keeps the last one) and reads booleans the YAML 1.2 way
(``country: NO`` stays the string ``"NO"``). :func:`pydantic_issues` turns a pydantic
``ValidationError`` into located :class:`~finetune.errors.Issue` objects with tenant-friendly
messages and "did you mean" hints.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml
from pydantic import BaseModel, ValidationError

from finetune.errors import Issue

Loc = tuple[str | int, ...]


_BaseLoader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when present


class _Loader(_BaseLoader):  # type: ignore[valid-type,misc]
    """SafeLoader with YAML 1.2 booleans: only true/false, never yes/no/on/off."""


_Loader.yaml_implicit_resolvers = {
    key: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.copy().items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


@dataclass
class LocatedDoc:
    """Parsed YAML, where its values were, and any problem found while parsing."""

    file: str | None
    data: Any = None
    lines: dict[Loc, int] = field(default_factory=dict)
    issues: list[Issue] = field(default_factory=list)

    def line_of(self, loc: Loc) -> int | None:
        """Line of the value at ``loc``, or of its nearest enclosing value that has one."""
        loc = tuple(loc)
        while loc:
            if loc in self.lines:
                return self.lines[loc]
            loc = loc[:-1]
        return self.lines.get((), None)


def _walk(node: yaml.Node, loc: Loc, doc: LocatedDoc) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value
            line = key_node.start_mark.line + 1
            if key in seen:
                path = ".".join(str(p) for p in (*loc, key))
                doc.issues.append(
                    Issue(path, f"duplicate key '{key}' (first at line {seen[key]})", file=doc.file, line=line)
                )
            seen[key] = line
            doc.lines[(*loc, key)] = line
            _walk(value_node, (*loc, key), doc)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            doc.lines[(*loc, i)] = item.start_mark.line + 1
            _walk(item, (*loc, i), doc)


def _plain_yaml_problem(problem: str, line_text: str) -> str:
    """PyYAML's and libyaml's parser jargon, said plainly for the common mistakes."""
    if "\t" in line_text[: len(line_text) - len(line_text.lstrip())]:
        return "tabs cannot indent YAML; use spaces"
    if "expected <block end>" in problem or "block mapping" in problem or "did not find expected key" in problem:
        return "this line's indentation does not match the lines around it"
    if "mapping values are not allowed" in problem:
        return "a ':' where none can be (quote text that contains ': ')"
    return problem


def parse_yaml_located(text: str, file: str | None = None) -> LocatedDoc:
    """Parse YAML text; problems go to ``doc.issues`` instead of raising."""
    doc = LocatedDoc(file=file)
    if text.startswith("\ufeff"):
        text = text[1:]
    if not text.strip() or all(ln.strip().startswith("#") or not ln.strip() for ln in text.splitlines()):
        doc.issues.append(Issue("", "the file is empty", file=file, hint="start from recipes/quickstart.yaml"))
        return doc
    try:
        loader = _Loader(text)
        try:
            node = loader.get_single_node()
            if node is None:
                doc.issues.append(Issue("", "the file is empty", file=file, hint="start from recipes/quickstart.yaml"))
                return doc
            doc.lines[()] = node.start_mark.line + 1
            _walk(node, (), doc)
            doc.data = loader.construct_document(node)
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        lines = text.splitlines()
        line_text = lines[mark.line] if mark is not None and mark.line < len(lines) else ""
        what = _plain_yaml_problem(exc.problem or exc.context or "invalid YAML", line_text)
        doc.issues.append(
            Issue(
                "",
                f"YAML syntax error: {what}",
                file=file,
                line=line,
                hint="check indentation and the ':' after each key",
            )
        )
    except yaml.YAMLError as exc:
        doc.issues.append(Issue("", f"YAML syntax error: {exc}", file=file))
    return doc


def load_yaml_located(path: Path) -> LocatedDoc:
    """Read and parse a YAML file; unreadable or non-UTF-8 files become issues, not crashes."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        return LocatedDoc(file=str(path), issues=[Issue("", f"cannot read file: {exc.strerror}", file=str(path))])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        return LocatedDoc(file=str(path), issues=[Issue("", "not valid UTF-8 text", file=str(path), line=line)])
    return parse_yaml_located(text, str(path))


# ------------------------------------------------------------------------------- pydantic errors


def suggest(word: str, choices: list[str]) -> str | None:
    """The closest choice to a mistyped word, if any is close enough."""
    found = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return found[0] if found else None


def _unwrap(tp: Any) -> list[Any]:
    """The concrete types behind Optional/Union/Annotated, in order."""
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(tp)[0])
    if origin in (Union, types.UnionType):
        return [t for arg in typing.get_args(tp) for t in _unwrap(arg)]
    return [tp]


def _tag_of(model: type[BaseModel]) -> str | None:
    """The literal value of a discriminated-union member's ``type`` field, if it has one."""
    info = model.model_fields.get("type")
    if info is None:
        return None
    args = typing.get_args(info.annotation)
    return str(args[0]) if len(args) == 1 else None


def _resolve(root: type[BaseModel], loc: Loc) -> tuple[Loc, type[BaseModel] | None]:
    """Follow ``loc`` through the model's types.

    Returns the location with discriminated-union tags removed (``method.full.rank`` becomes
    ``method.rank``) and the model class of the value at ``loc``, if it is one (for "did you mean").
    """
    clean: list[str | int] = []
    current: Any = root
    i = 0
    while i < len(loc):
        part = loc[i]
        i += 1
        candidates = _unwrap(current)
        models = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        tagged = {_tag_of(m): m for m in models if _tag_of(m)}
        if len(models) > 1 and part in tagged:
            current = tagged[part]
            continue
        if len(candidates) > 1 and isinstance(part, str) and not models:
            continue  # a smart-union member label such as "list[str]": not a place in the document
        model = models[0] if len(models) == 1 else None
        clean.append(part)
        if model is not None and isinstance(part, str) and part in model.model_fields:
            current = model.model_fields[part].annotation
            continue
        container = next((c for c in candidates if typing.get_origin(c) in (list, tuple, dict)), None)
        if container is not None:
            args = typing.get_args(container)
            current = args[-1] if args else Any
            continue
        return tuple(clean) + tuple(loc[i:]), None
    models = [c for c in _unwrap(current) if isinstance(c, type) and issubclass(c, BaseModel)]
    return tuple(clean), models[0] if len(models) == 1 else None


def _parent_model(root: type[BaseModel], loc: Loc) -> type[BaseModel] | None:
    return _resolve(root, loc[:-1])[1]


def _show(value: Any) -> str:
    if isinstance(value, str):
        return repr(value) if len(value) <= 60 else repr(value[:57] + "...")
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return repr(value)


_TYPE_WORDS = {
    "int": "a whole number",
    "float": "a number",
    "bool": "true or false",
    "string": "text",
    "dict": "a mapping of settings",
    "model": "a mapping of settings",
    "list": "a list",
    "tuple": "a list",
}


def _tagged_variants(root: type[BaseModel], loc: Loc) -> dict[str, type[BaseModel]]:
    """Members of the discriminated union at ``loc`` (e.g. ``method``), by tag; empty if none."""
    current: Any = root
    for part in loc:
        models = [c for c in _unwrap(current) if isinstance(c, type) and issubclass(c, BaseModel)]
        if len(models) != 1 or not isinstance(part, str) or part not in models[0].model_fields:
            return {}
        current = models[0].model_fields[part].annotation
    members = [c for c in _unwrap(current) if isinstance(c, type) and issubclass(c, BaseModel)]
    return {tag: m for m in members if (tag := _tag_of(m))}


def _unknown_key(root: type[BaseModel], loc: Loc) -> tuple[str, str | None]:
    key = str(loc[-1])
    if len(loc) >= 3:
        variants = _tagged_variants(root, loc[:-2])
        tag = str(loc[-2])
        if tag in variants:
            union = str(loc[-3])
            owners = [t for t, m in variants.items() if key in m.model_fields]
            hint = f"'{key}' is a setting of {union} type {' or '.join(owners)}" if owners else None
            return f"'{key}' is not a setting of {union} type '{tag}'", hint
    parent = _parent_model(root, loc)
    hint = None
    if parent is not None:
        close = suggest(key, list(parent.model_fields))
        hint = f"did you mean '{close}'?" if close else "allowed: " + ", ".join(parent.model_fields)
    return f"unknown setting '{key}'", hint


def _message(err: Any, root: type[BaseModel], loc: Loc) -> tuple[str, str | None]:
    kind = err["type"]
    ctx = err.get("ctx") or {}
    value = err.get("input")
    if kind == "extra_forbidden":
        return _unknown_key(root, loc)
    if kind == "missing":
        return "required setting is missing", None
    if kind in ("less_than_equal", "less_than", "greater_than_equal", "greater_than"):
        words = {
            "less_than_equal": "at most",
            "less_than": "less than",
            "greater_than_equal": "at least",
            "greater_than": "more than",
        }
        bound = next(iter(ctx.values()))
        return f"must be {words[kind]} {bound} (got {_show(value)})", None
    if kind in ("too_short", "too_long"):
        return err["msg"].replace("Value", "value"), None
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')} (got {_show(value)})", None
    if kind == "union_tag_invalid":
        what = ctx.get("discriminator", "type")
        return f"unknown {what} {_show(ctx.get('tag'))}; must be one of {ctx.get('expected_tags')}", None
    if kind == "union_tag_not_found":
        return f"needs a {ctx.get('discriminator', 'type')} setting", None
    if kind in ("value_error", "assertion_error"):
        return str(ctx.get("error", err["msg"])), None
    base = kind.split("_")[0]
    if base in _TYPE_WORDS and (kind.endswith("_type") or kind.endswith("_parsing")):
        return f"must be {_TYPE_WORDS[base]} (got {_show(value)})", None
    if kind == "model_type" or kind == "model_attributes_type" or kind == "dict_type":
        return f"must be a mapping of settings (got {_show(value)})", None
    return err["msg"], None


def pydantic_issues(exc: ValidationError, doc: LocatedDoc, root: type[BaseModel] | None = None) -> list[Issue]:
    """Translate a ValidationError into located issues, one per error, in document order."""
    issues = []
    for err in exc.errors(include_url=False):
        raw_loc: Loc = tuple(err["loc"])
        loc, _ = _resolve(root, raw_loc) if root is not None else (raw_loc, None)
        message, hint = _message(err, root, raw_loc) if root is not None else (err["msg"], None)
        line = doc.line_of(tuple(loc))
        issues.append(Issue(".".join(str(p) for p in loc), message, file=doc.file, line=line, hint=hint))
    issues.sort(key=lambda i: (i.line or 0, i.path))
    return issues
