"""YAML documents that remember where each value came from, and pydantic errors told plainly.

Tenants write recipes by hand or get them from a form; either way an error must point at the
line. :func:`load_yaml_located` parses YAML into plain data plus a map from field path to line,
refuses duplicate keys (YAML silently keeps the last one) and reads scalars the YAML 1.2 way
(``country: NO`` stays the string ``"NO"``, dates stay text). :func:`pydantic_issues` turns a
pydantic ``ValidationError`` into located :class:`~finetune.errors.Issue` objects with
tenant-friendly messages and "did you mean" hints.

Recipes are hostile input: the loader enforces :class:`~finetune.limits.Limits` (size, depth,
aliases, values, digits) while it composes, and refuses tags other than the plain types, so an
alias bomb or ``!!python/...`` becomes a located issue before any Python object is built.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, Union

import yaml
import yaml.composer
import yaml.constructor
import yaml.parser
import yaml.reader
import yaml.resolver
import yaml.scanner
from pydantic import BaseModel, ValidationError

from finetune.errors import Issue
from finetune.limits import DEFAULT_LIMITS, Limits, more_problems

Loc = tuple[str | int, ...]

_YAML = "tag:yaml.org,2002:"
#: Explicit tags a recipe may carry; anything else (``!!python/...``, ``!!binary``, ``!custom``) is refused.
_PLAIN_TAGS = {"!", *(_YAML + t for t in ("str", "int", "float", "bool", "null", "seq", "map"))}


class _Resolver(yaml.resolver.Resolver):
    """YAML 1.2 core types: booleans are only true/false (never yes/no/on/off); dates stay text."""


_Resolver.yaml_implicit_resolvers = {
    key: [(tag, rx) for tag, rx in resolvers if tag not in {_YAML + t for t in ("bool", "timestamp", "value", "yaml")}]
    for key, resolvers in yaml.resolver.Resolver.yaml_implicit_resolvers.copy().items()
}
_Resolver.add_implicit_resolver(_YAML + "bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


class _Refused(Exception):
    """A document over one of the :class:`~finetune.limits.Limits`, or holding what a recipe may not."""

    def __init__(self, message: str, hint: str | None, mark: Any, path: Loc) -> None:
        super().__init__(message)
        self.message, self.hint, self.path = message, hint, path
        self.line: int | None = mark.line + 1 if mark is not None else None


def _short_tag(tag: str) -> str:
    return "!!" + tag[len(_YAML) :] if tag.startswith(_YAML) else tag


class _BoundedComposer(yaml.composer.Composer):
    """PyYAML's composer, counting as it goes so that a hostile document is refused early.

    The composer hands every alias back as the node it names, so ten lines of aliases can stand
    for a billion values: each alias is counted as the values and levels its anchor expands to,
    and composing stops at the first limit crossed, before any Python object is built.
    """

    # from the parser mixed in beside it
    check_event: Callable[..., bool]
    peek_event: Callable[[], Any]

    def __init__(self, limits: Limits) -> None:
        super().__init__()
        self.limits = limits
        self._depth = 0
        self._deepest = 0  # the deepest level reached, aliases expanded, within the node being composed
        self._values = 0  # values so far, aliases expanded
        self._aliases = 0
        self._expands: dict[str, tuple[int, int]] = {}  # anchor -> (values, levels) it stands for
        self._path: list[str | int] = []

    def _refuse(self, message: str, hint: str | None, mark: Any) -> NoReturn:
        raise _Refused(message, hint, mark, tuple(self._path))

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        part = index if isinstance(index, int) else index.value if isinstance(index, yaml.ScalarNode) else None
        if part is not None:
            self._path.append(part)
        if self.check_event(yaml.AliasEvent):
            self._count_alias(self.peek_event())
            node = super().compose_node(parent, index)
        else:
            node = self._compose_counted(parent, index)
        if parent is not None and index is None and node is not None and not isinstance(node, yaml.ScalarNode):
            self._refuse("a key must be plain text, not a list or a mapping", None, node.start_mark)
        if part is not None:
            self._path.pop()
        return node

    def _count_alias(self, event: yaml.AliasEvent) -> None:
        lim = self.limits
        self._aliases += 1
        if self._aliases > lim.max_aliases:
            hint = f"a recipe may use at most {lim.max_aliases} aliases (limit max_aliases): write the values out"
            self._refuse(f"more than {lim.max_aliases} YAML aliases (*name)", hint, event.start_mark)
        anchor = str(event.anchor)
        if anchor not in self._expands:
            if anchor in self.anchors:
                self._refuse(f"alias '*{anchor}' is inside the value it names", None, event.start_mark)
            return  # an undefined alias: the composer says so
        values, levels = self._expands[anchor]
        self._add_values(values, event.start_mark)
        self._check_depth(self._depth + levels, event.start_mark)
        self._deepest = max(self._deepest, self._depth + levels)

    def _compose_counted(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        event = self.peek_event()
        if event.tag is not None and event.tag not in _PLAIN_TAGS:
            hint = "a recipe holds plain values only (text, numbers, true/false, lists, mappings): remove the tag"
            self._refuse(f"YAML tag '{_short_tag(event.tag)}' is not allowed", hint, event.start_mark)
        self._depth += 1
        self._check_depth(self._depth, event.start_mark)
        self._add_values(1, event.start_mark)
        first, outer_deepest, self._deepest = self._values, self._deepest, self._depth
        node = super().compose_node(parent, index)
        if event.anchor is not None:
            self._expands[event.anchor] = (self._values - first + 1, self._deepest - self._depth + 1)
        self._deepest = max(outer_deepest, self._deepest)
        self._depth -= 1
        if isinstance(node, yaml.ScalarNode):
            self._check_scalar(node, explicit=event.tag not in (None, "!"))
        return node

    def _add_values(self, count: int, mark: Any) -> None:
        self._values += count
        if self._values > self.limits.max_nodes:
            n = self.limits.max_nodes
            hint = f"a recipe may hold at most {n} values (limit max_nodes)"
            message = f"the document holds more than {n} values (aliases counted as what they stand for)"
            self._refuse(message, hint, mark)

    def _check_depth(self, depth: int, mark: Any) -> None:
        if depth > self.limits.max_depth:
            n = self.limits.max_depth
            hint = f"a recipe may nest at most {n} levels (limit max_depth)"
            self._refuse(f"values are nested more than {n} levels deep", hint, mark)

    def _check_scalar(self, node: yaml.ScalarNode, explicit: bool) -> None:
        if node.tag == _YAML + "int":
            digits = len(re.sub(r"^[-+]?(0[xob])?|[_:]", "", node.value))
            if digits > self.limits.max_int_digits:
                n = self.limits.max_int_digits
                hint = f"whole numbers have at most {n} digits (limit max_int_digits)"
                self._refuse(f"a whole number of {digits} digits", hint, node.start_mark)
        if explicit and node.tag != _YAML + "str":
            try:  # an explicit !!int or !!float on a value that is not one
                self.construct_object(node)  # type: ignore[attr-defined]
            except (ValueError, LookupError, TypeError, ArithmeticError):
                what = _short_tag(node.tag)
                self._refuse(f"'{node.value[:60]}' is not a valid {what}", f"remove the {what} tag", node.start_mark)


class _PyParser(yaml.reader.Reader, yaml.scanner.Scanner, yaml.parser.Parser):
    """PyYAML's own scanner and parser, for when libyaml is not installed."""

    def __init__(self, stream: str) -> None:
        yaml.reader.Reader.__init__(self, stream)
        yaml.scanner.Scanner.__init__(self)
        yaml.parser.Parser.__init__(self)


def _fastest_parser() -> Any:
    try:
        from yaml._yaml import CParser
    except ImportError:  # PyYAML built without libyaml
        return _PyParser
    return CParser


_Parser = _fastest_parser()
_LIBYAML = _Parser is not _PyParser


def _loader_class(parser: Any) -> Any:
    class Loader(_BoundedComposer, parser, yaml.constructor.SafeConstructor, _Resolver):
        def __init__(self, text: str, limits: Limits) -> None:
            parser.__init__(self, text)
            _BoundedComposer.__init__(self, limits)
            yaml.constructor.SafeConstructor.__init__(self)
            _Resolver.__init__(self)

    return Loader


_Loader: Any = _loader_class(_Parser)


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
    """Record lines and refuse duplicate keys; the composer has bounded the depth and the size."""
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


def _size(n: int) -> str:
    return f"{n // 2**20} MiB" if n % 2**20 == 0 else f"{n} bytes"


def _too_big(file: str | None, limits: Limits) -> Issue:
    n = limits.max_file_bytes
    hint = f"a recipe may be at most {_size(n)} (limit max_file_bytes); data belongs in data files, not the recipe"
    return Issue("", f"the file is larger than {_size(n)}", file=file, hint=hint)


def _line_at(text: str, offset: int, unit: str) -> int:
    """1-based line of a character offset, or of a UTF-8 byte offset (libyaml counts bytes)."""
    if unit == "bytes":
        return text.encode("utf-8", "surrogatepass")[:offset].count(b"\n") + 1
    return text[:offset].count("\n") + 1


def _yaml_error_issue(exc: yaml.YAMLError, text: str, file: str | None, limits: Limits) -> Issue:
    if isinstance(exc, yaml.reader.ReaderError):  # a control character, say
        at = _line_at(text, exc.position, "bytes" if _LIBYAML else "chars")
        return Issue("", f"not valid YAML text: {str(exc).splitlines()[0]}", file=file, line=at)
    if not isinstance(exc, yaml.MarkedYAMLError):
        return Issue("", f"YAML syntax error: {exc}", file=file)
    mark = exc.problem_mark or exc.context_mark
    line = mark.line + 1 if mark is not None else None
    problem = exc.problem or exc.context or "invalid YAML"
    if "maximum nesting depth" in problem:  # libyaml's own bound, met while it scans ahead
        n = limits.max_depth
        hint = f"a recipe may nest at most {n} levels (limit max_depth)"
        return Issue("", "values are nested too deeply", file=file, line=line, hint=hint)
    if isinstance(exc, yaml.composer.ComposerError):  # two documents, an undefined or a repeated anchor
        context = (exc.context or "").split(";")[0]
        return Issue("", "YAML error: " + ", ".join(p for p in (context, exc.problem) if p), file=file, line=line)
    if isinstance(exc, yaml.constructor.ConstructorError):
        return Issue("", f"YAML error: {problem}", file=file, line=line)
    lines = text.splitlines()
    line_text = lines[mark.line] if mark is not None and mark.line < len(lines) else ""
    what = _plain_yaml_problem(problem, line_text)
    hint = "check indentation and the ':' after each key"
    return Issue("", f"YAML syntax error: {what}", file=file, line=line, hint=hint)


def _empty(file: str | None) -> LocatedDoc:
    hint = "start from recipes/quickstart.yaml"
    return LocatedDoc(file, issues=[Issue("", "the file is empty", file=file, hint=hint)])


def parse_yaml_located(text: str, file: str | None = None, limits: Limits = DEFAULT_LIMITS) -> LocatedDoc:
    """Parse untrusted YAML text within ``limits``; problems go to ``doc.issues`` instead of raising.

    Args:
        text: The document.
        file: Its name, for the issues' locations.
        limits: Size, depth, alias, value-count and integer-length bounds; a document over one
            of them is refused with a located issue naming the limit.
    """
    doc = LocatedDoc(file=file)
    if len(text) > limits.max_file_bytes or len(text.encode("utf-8", "surrogatepass")) > limits.max_file_bytes:
        doc.issues.append(_too_big(file, limits))
        return doc
    if text.startswith("\ufeff"):
        text = text[1:]
    if not text.strip() or all(ln.strip().startswith("#") or not ln.strip() for ln in text.splitlines()):
        return _empty(file)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate, which only text handed over in Python can hold
        doc.issues.append(Issue("", "not valid UTF-8 text", file=file, line=_line_at(text, exc.start, "chars")))
        return doc
    loader = None
    try:
        loader = _Loader(text, limits)  # PyYAML's reader refuses control characters here already
        node = loader.get_single_node()
        if node is None:
            return _empty(file)
        doc.lines[()] = node.start_mark.line + 1
        _walk(node, (), doc)
        if not doc.issues:
            doc.data = loader.construct_document(node)
    except _Refused as exc:
        path = ".".join(str(p) for p in exc.path)
        doc.issues.append(Issue(path, exc.message, file=file, line=exc.line, hint=exc.hint))
    except yaml.YAMLError as exc:
        doc.issues.append(_yaml_error_issue(exc, text, file, limits))
    finally:
        if loader is not None:
            loader.dispose()
    return doc


def load_yaml_located(path: Path, limits: Limits = DEFAULT_LIMITS) -> LocatedDoc:
    """Read and parse a YAML file within ``limits``; unreadable, oversized or non-UTF-8 files
    become issues, not crashes. No more than ``limits.max_file_bytes`` + 1 bytes are read."""
    file = str(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(limits.max_file_bytes + 1)
    except OSError as exc:
        return LocatedDoc(file=file, issues=[Issue("", f"cannot read file: {exc.strerror}", file=file)])
    if len(raw) > limits.max_file_bytes:
        return LocatedDoc(file=file, issues=[_too_big(file, limits)])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        return LocatedDoc(file=file, issues=[Issue("", "not valid UTF-8 text", file=file, line=line)])
    return parse_yaml_located(text, file, limits)


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
    if kind == "string_too_short":
        n = ctx.get("min_length")
        return ("must not be empty" if n == 1 else f"must be at least {n} characters long"), None
    if kind == "string_too_long":
        got = f" (got {len(value)})" if isinstance(value, str) else ""
        return f"must be at most {ctx.get('max_length')} characters long{got}", None
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
        error = ctx.get("error", err["msg"])
        return str(error), getattr(error, "hint", None)  # a validator may say what to do, as recipe.py's do
    if kind == "int_parsing_size":
        return f"the number is too large (got {_show(value)})", None
    base = kind.split("_")[0]
    if base in _TYPE_WORDS and (kind.endswith("_type") or kind.endswith("_parsing")):
        return f"must be {_TYPE_WORDS[base]} (got {_show(value)})", None
    if kind == "model_type" or kind == "model_attributes_type" or kind == "dict_type":
        return f"must be a mapping of settings (got {_show(value)})", None
    return err["msg"], None


def pydantic_issues(
    exc: ValidationError, doc: LocatedDoc, root: type[BaseModel] | None = None, *, limits: Limits | None = None
) -> list[Issue]:
    """Translate a ValidationError into located issues, one per error, in document order.

    Args:
        exc: The error.
        doc: The document that was validated, for the lines.
        root: The model validated, for plain messages and "did you mean" hints.
        limits: When given, only the first ``limits.max_issues`` are worded (a hostile document
            can hold thousands of unknown keys) and the rest are counted, as :func:`cap_issues` does.
    """
    located = []
    for err in exc.errors(include_url=False):
        raw_loc: Loc = tuple(err["loc"])
        loc, _ = _resolve(root, raw_loc) if root is not None else (raw_loc, None)
        located.append((doc.line_of(tuple(loc)) or 0, ".".join(str(p) for p in loc), raw_loc, err))
    located.sort(key=lambda item: item[:2])
    shown = located if limits is None else located[: limits.max_issues]
    issues = []
    for line, path, raw_loc, err in shown:
        message, hint = _message(err, root, raw_loc) if root is not None else (err["msg"], None)
        issues.append(Issue(path, message, file=doc.file, line=line or None, hint=hint))
    if len(located) > len(shown):
        issues.append(more_problems(len(located) - len(shown), doc.file))
    return issues
