"""Located YAML parsing and plain-language pydantic errors."""

import time
from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from finetune import yamlio
from finetune.limits import DEFAULT_LIMITS, Limits
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


# ------------------------------------------------------------------------- limits on hostile input


@pytest.fixture(params=["libyaml", "pure-python"])
def parser(request, monkeypatch):
    """Run a test with libyaml's parser (when installed) and with PyYAML's own."""
    if request.param == "pure-python":
        monkeypatch.setattr(yamlio, "_Loader", yamlio._loader_class(yamlio._PyParser))
        monkeypatch.setattr(yamlio, "_LIBYAML", False)
    elif not yamlio._LIBYAML:
        pytest.skip("PyYAML has no libyaml here")
    return request.param


def only_issue(text: str, limits: Limits = DEFAULT_LIMITS) -> str:
    doc = parse_yaml_located(text, "f.yaml", limits)
    assert doc.data is None
    [issue] = doc.issues
    return str(issue)


def laughs(levels: int, width: int = 10) -> str:
    lines = [f"a0: &a0 [{', '.join(['lol'] * width)}]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def test_alias_expansion_is_refused_before_anything_is_built(parser):
    start = time.process_time()  # CPU time: the machine may be busy with other work
    message = only_issue(laughs(9))
    assert time.process_time() - start < 0.5
    assert message.startswith("f.yaml:5: a4.")
    assert "more than 100000 values" in message and "limit max_nodes" in message
    assert parse_yaml_located(laughs(3)).data["a2"][9][9][9] == "lol"  # 1,000 values: an honest use


def test_too_many_aliases(parser):
    text = "a: &a 1\nb: [" + ", ".join(["*a"] * 101) + "]\n"
    assert only_issue(text) == (
        "f.yaml:2: b.100: more than 100 YAML aliases (*name) "
        "(hint: a recipe may use at most 100 aliases (limit max_aliases): write the values out)"
    )


def test_an_alias_inside_its_own_anchor_is_refused(parser):
    assert only_issue("a: &a [1, *a]\n") == "f.yaml:1: a.1: alias '*a' is inside the value it names"


def test_aliases_count_towards_depth(parser):
    inner = "[" * 40 + "]" * 40
    outer = "[" * 26 + "*a" + "]" * 26
    assert "nested more than 64 levels" in only_issue(f"a: &a {inner}\nb: {outer}\n")


@pytest.mark.parametrize("text", ["a: " + "[" * 100_000, "a: " + "{a: " * 50_000, "a: " + "[" * 500 + "]" * 500])
def test_deep_nesting_is_refused_without_recursion(parser, text):
    message = only_issue(text)
    assert message.startswith("f.yaml:1: ") and "nested" in message and "limit max_depth" in message


def test_depth_64_is_allowed_and_65_is_not(parser):
    def nested(n: int) -> str:
        return "[" * (n - 1) + "1" + "]" * (n - 1)

    assert parse_yaml_located(nested(64)).issues == []
    assert "nested more than 64 levels" in only_issue(nested(65))


def test_long_integers_are_refused_with_their_field(parser):
    text = "training:\n  seed: " + "9" * 5000 + "\n"
    assert only_issue(text) == (
        "f.yaml:2: training.seed: a whole number of 5000 digits "
        "(hint: whole numbers have at most 30 digits (limit max_int_digits))"
    )
    assert "40 digits" in only_issue("a: 0x" + "f" * 40 + "\n")
    assert parse_yaml_located("a: 123_456_789\nb: -0x1F\nc: '" + "9" * 5000 + "'\n").data["b"] == -31


@pytest.mark.parametrize(
    "tag", ["!!python/object/apply:os.system", "!!python/name:os.system", "!!binary", "!!timestamp", "!custom"]
)
def test_tags_other_than_plain_types_are_refused(parser, tag):
    message = only_issue(f"a:\n  b: {tag} x\n")
    assert message == (
        f"f.yaml:2: a.b: YAML tag '{tag}' is not allowed (hint: a recipe holds plain values only "
        "(text, numbers, true/false, lists, mappings): remove the tag)"
    )


def test_plain_tags_are_read_and_wrong_ones_located(parser):
    assert parse_yaml_located("a: !!str 12\nb: !!int '7'\nc: !!float 1\n").data == {"a": "12", "b": 7, "c": 1.0}
    assert only_issue("a: 1\nb: !!int abc\n") == "f.yaml:2: b: 'abc' is not a valid !!int (hint: remove the !!int tag)"
    assert only_issue("b: !!bool maybe\n").endswith("'maybe' is not a valid !!bool (hint: remove the !!bool tag)")


def test_yaml_11_oddities_stay_text(parser):
    assert parse_yaml_located("a: 2024-13-45\nb: 2024-01-02\nc: =\n").data == {
        "a": "2024-13-45",
        "b": "2024-01-02",
        "c": "=",
    }


def test_keys_must_be_plain_text(parser):
    assert only_issue("? [a]\n: 1\n") == "f.yaml:1: a key must be plain text, not a list or a mapping"
    assert "a key must be plain text" in only_issue("x: &k {a: 1}\n*k : 2\n")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a: 1\nb: \x00\n", "f.yaml:2: not valid YAML text: unacceptable character #x0000"),
        ("é: 1\nb: 2\nc: \x07\n", "f.yaml:3: not valid YAML text: unacceptable character #x0007"),
        ("a: 1\nb: \ud800\n", "f.yaml:2: not valid UTF-8 text"),
        ("a: 1\n---\nb: 2\n", "f.yaml:2: YAML error: expected a single document in the stream"),
        ("a: &x 1\nb: &x 2\n", "f.yaml:2: YAML error: found duplicate anchor 'x'"),
        ("a: *nowhere\n", "f.yaml:1: YAML error: found undefined alias 'nowhere'"),
    ],
)
def test_unreadable_text_is_located(parser, text, message):
    assert only_issue(text).startswith(message)


def test_oversized_text_and_files_are_refused_before_parsing(tmp_path):
    small = Limits(max_file_bytes=100)
    assert only_issue("a: " + "x" * 98, small) == (
        "f.yaml: the file is larger than 100 bytes "
        "(hint: a recipe may be at most 100 bytes (limit max_file_bytes); data belongs in data files, not the recipe)"
    )
    assert parse_yaml_located("a: " + "x" * 97, "f.yaml", small).issues == []
    big = tmp_path / "big.yaml"
    big.write_bytes(b"a: " + b"x" * (2 * 2**20))
    assert [i.message for i in load_yaml_located(big).issues] == ["the file is larger than 1 MiB"]


def test_the_file_is_read_no_further_than_the_limit():
    endless = Path("/dev/zero")  # reading it whole would never end
    if not endless.exists():
        pytest.skip("no /dev/zero here")
    [issue] = load_yaml_located(endless, Limits(max_file_bytes=1000)).issues
    assert issue.message == "the file is larger than 1000 bytes"


def test_limits_are_arguments():
    tight = Limits(max_depth=3, max_aliases=1, max_nodes=7, max_int_digits=2)
    assert "limit max_depth" in only_issue("a: [[1]]\n", tight)
    assert "limit max_aliases" in only_issue("a: &a 1\nb: [*a, *a]\n", tight)
    assert "limit max_nodes" in only_issue("a: 1\nb: 2\nc: 3\nd: 4\n", tight)
    assert "limit max_int_digits" in only_issue("a: 100\n", tight)
    assert parse_yaml_located("a: [1]\nb: 99\n", limits=tight).data == {"a": [1], "b": 99}


def test_pydantic_issues_word_only_the_first_ones_and_count_the_rest():
    doc = parse_yaml_located("name: x\n" + "".join(f"k{i}: 1\n" for i in range(10)), "r.yaml")
    with pytest.raises(ValidationError) as exc:
        Outer.model_validate(doc.data)
    issues = pydantic_issues(exc.value, doc, Outer, limits=Limits(max_issues=3))
    assert [str(i) for i in issues] == [
        "r.yaml:2: k0: unknown setting 'k0' (hint: allowed: inner, name)",
        "r.yaml:3: k1: unknown setting 'k1' (hint: allowed: inner, name)",
        "r.yaml:4: k2: unknown setting 'k2' (hint: allowed: inner, name)",
        "r.yaml: ... and 7 more problems",
    ]
    assert issues[-1].as_dict()["more"] == 7
    assert len(pydantic_issues(exc.value, doc, Outer)) == 10
