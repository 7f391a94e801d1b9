"""Located YAML parsing and plain-language pydantic errors."""

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from finetune.yamlio import load_yaml_located, parse_yaml_located, pydantic_issues


def test_lines_are_recorded_for_keys_and_items():
    doc = parse_yaml_located("a:\n  b: 1\n  c:\n    - x\n    - y\n", "f.yaml")
    assert doc.issues == []
    assert doc.data == {"a": {"b": 1, "c": ["x", "y"]}}
    assert doc.line_of(("a", "b")) == 2
    assert doc.line_of(("a", "c", 1)) == 5
    assert doc.line_of(("a", "missing", "deeper")) == 1  # falls back to the nearest enclosing value


def test_yaml_12_booleans_keep_country_codes_as_text():
    doc = parse_yaml_located("country: NO\nflag: yes\nreal: true\n")
    assert doc.data == {"country": "NO", "flag": "yes", "real": True}


def test_duplicate_keys_are_refused_with_both_lines():
    doc = parse_yaml_located("a: 1\nb: 2\na: 3\n", "f.yaml")
    assert [str(i) for i in doc.issues] == ["f.yaml:3: a: duplicate key 'a' (first at line 1)"]


def test_syntax_error_is_located():
    doc = parse_yaml_located("a:\n  b: 1\n c: 2\n", "f.yaml")
    assert len(doc.issues) == 1
    assert doc.issues[0].line == 3
    assert doc.issues[0].message.startswith("YAML syntax error:")


def test_empty_and_comment_only_files():
    for text in ("", "\n\n", "# nothing here\n"):
        doc = parse_yaml_located(text, "f.yaml")
        assert [i.message for i in doc.issues] == ["the file is empty"]


def test_bom_is_accepted_and_bad_utf8_is_located(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_bytes("\ufeffname: 臺灣\n".encode())
    assert load_yaml_located(good).data == {"name": "臺灣"}
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"a: 1\nb: \xff\xfe\n")
    issues = load_yaml_located(bad).issues
    assert [(i.line, i.message) for i in issues] == [(2, "not valid UTF-8 text")]


def test_missing_file_is_an_issue_not_a_crash(tmp_path):
    issues = load_yaml_located(tmp_path / "nope.yaml").issues
    assert issues[0].message.startswith("cannot read file")


class Inner(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rate: float = Field(default=1.0, le=2.0)
    count: int = 1


class Outer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    inner: Inner = Field(default_factory=Inner)
    name: str


def test_pydantic_errors_become_located_plain_messages():
    doc = parse_yaml_located("inner:\n  rate: 5\n  cuont: 2\n  count: many\n", "r.yaml")
    try:
        Outer.model_validate(doc.data)
    except ValidationError as exc:
        issues = pydantic_issues(exc, doc, Outer)
    assert [str(i) for i in issues] == [
        "r.yaml:1: name: required setting is missing",
        "r.yaml:2: inner.rate: must be at most 2.0 (got 5)",
        "r.yaml:3: inner.cuont: unknown setting 'cuont' (hint: did you mean 'count'?)",
        "r.yaml:4: inner.count: must be a whole number (got 'many')",
    ]
