"""Hostile recipes: each is refused fast, in bounded memory, with a located message and no traceback.

Recipes come from tenants, so ``finetune validate`` runs here as a separate process under a 2 GiB
address-space limit and a timeout, as it would on the platform. A seeded fuzz of YAML-ish text
then checks that the loader answers any input with located issues or bounded data, never an
exception. (``hypothesis`` is not installed in this environment; the fuzz uses ``random.Random``.)
"""

from __future__ import annotations

import itertools
import json
import random
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from finetune import yamlio
from finetune.errors import Issue
from finetune.limits import Limits
from finetune.registry import Registry
from finetune.settings import get_settings
from finetune.validate import validate_text
from finetune.yamlio import parse_yaml_located

ROOT = Path(__file__).resolve().parents[1]
HEAD = "model:\n  id: llama-3.2-1b-instruct\ndata:\n  path: data/train.jsonl\n"
MEMORY = 2 << 30  # bytes of address space the validating process may use
MAX_OUTPUT = 100_000  # bytes of standard output a hostile recipe may cause


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY, MEMORY))


def validate(path: Path, *options: str) -> tuple[int, str, float]:
    """``finetune validate`` in its own process: exit code, standard output, CPU seconds it took.

    CPU time rather than wall time: the machine running the tests may be busy with other work.
    """
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(
        [sys.executable, "-m", "finetune.cli", "validate", *options, str(path)],
        capture_output=True,
        timeout=20,
        preexec_fn=_limit_memory,
        cwd=ROOT,
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    seconds = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    assert len(proc.stdout) < MAX_OUTPUT
    assert b"Traceback" not in proc.stderr, proc.stderr.decode(errors="replace")[-2000:]
    return proc.returncode, proc.stdout.decode(), seconds


def laughs(levels: int, width: int = 10) -> str:
    lines = [f"l0: &l0 [{', '.join(['lol'] * width)}]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels)]
    return HEAD + "\n".join(lines) + "\n"


HOSTILE: dict[str, tuple[Callable[[], str | bytes], str]] = {
    # name: (a function giving the file's text or bytes, what the output starts with after "<path>")
    "billion_laughs": (lambda: laughs(10), ":9: l4.7: the document holds more than 100000 values"),
    "huge_integer": (
        lambda: HEAD + "training:\n  max_steps: " + "9" * 5000 + "\n",
        ":6: training.max_steps: a whole number of 5000 digits",
    ),
    "deep_nesting": (lambda: "model: " + "[" * 100_000 + "\n", ":1: values are nested"),
    "deep_closed": (lambda: HEAD + "x: " + "[" * 900 + "]" * 900 + "\n", ":5: x.0.0.0.0.0.0.0.0.0.0.0.0.0."),
    "unknown_keys_500k": (
        lambda: HEAD + "".join(f"k{i}: 1\n" for i in range(500_000)),
        ": the file is larger than 1 MiB",
    ),
    "python_tag": (
        lambda: HEAD.replace("data/train.jsonl", "!!python/object/apply:os.mkdir [PWNED]"),
        ":4: data.path: YAML tag '!!python/object/apply:os.mkdir' is not allowed",
    ),
    "python_name": (
        lambda: "model: !!python/name:os.system\n",
        ":1: model: YAML tag '!!python/name:os.system' is not allowed",
    ),
    "name_absolute": (lambda: "name: /etc/cron.d/x\n" + HEAD, ":1: name: a job name is a label, not a path"),
    "name_dotdot": (lambda: "name: ../../x\n" + HEAD, ":1: name: a job name is a label, not a path"),
    "name_hidden": (lambda: "name: .x\n" + HEAD, ":1: name: a job name cannot start with '.'"),
    "fifty_megabytes": (lambda: b"# " + b"x" * (50 * 2**20) + b"\n", ": the file is larger than 1 MiB"),
    "control_characters": (
        lambda: HEAD + "name: a\x00b\n",
        ":5: not valid YAML text: unacceptable character #x0000",
    ),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_recipe_is_refused_fast_and_located(tmp_path, name):
    make, expected = HOSTILE[name]
    content = make()
    path = tmp_path / f"{name}.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content.replace("PWNED", str(tmp_path / "pwned")), encoding="utf-8")
    code, out, seconds = validate(path)
    assert code == 2
    assert out.startswith(f"{path}{expected}"), out[:500]
    assert "(hint: " in out or name.startswith("control")
    assert seconds < 5
    assert not (tmp_path / "pwned").exists()


def test_many_unknown_keys_print_the_first_problems_and_a_count(tmp_path):
    path = tmp_path / "keys.yaml"
    path.write_text(HEAD + "".join(f"k{i}: 1\n" for i in range(20_000)), encoding="utf-8")
    code, out, seconds = validate(path)
    lines = out.splitlines()
    assert code == 2 and seconds < 5
    assert lines[0].startswith(f"{path}:5: k0: unknown setting 'k0'")
    assert lines[50:] == [f"{path}: ... and 19950 more problems"]
    code, out, _ = validate(path, "--json")
    [result] = json.loads(out)
    assert code == 2 and len(result["issues"]) == 51 and result["issues"][-1]["more"] == 19_950


def test_a_device_is_read_no_further_than_the_limit():
    if not Path("/dev/zero").exists():
        pytest.skip("no /dev/zero here")
    code, out, seconds = validate(Path("/dev/zero"))
    assert code == 2 and out.startswith("/dev/zero: the file is larger than 1 MiB (hint: ")
    assert seconds < 5


# ----------------------------------------------------------------------------------------- fuzz

FRAGMENTS = [
    "a", "model", "data", "name", "id", ":", ": ", " ", "  ", "\n", "\n  ", "- ", "-", "[", "]", "{", "}", ",",
    "&a ", "&b ", "*a", "*b", "*c", "<<: ", "? ", "!!int ", "!!str ", "!!float ", "!!bool ", "!!null ", "!!seq ",
    "!!map ", "!!binary ", "!!python/object/apply:os.system ", "!custom ", "! ", "'", '"', "#", "|", ">", "---",
    "...", "\t", "%YAML 1.2\n", "%TAG ! tag:x,2000:\n", "é", "臺灣", "\ufeff", "\u202e", "=", "~", "1", "-0x1F",
    "0o17", "1_000", "1:30", "99999999999999999999999999999999999999", "1e400", ".nan", "-.inf", "true", "yes",
    "NO", "null", "2024-13-45", "2024-01-02T03:04:05Z", "\\", "\\u0000", "%", "@", "`",
]  # fmt: skip
TIGHT = Limits(max_file_bytes=4000, max_depth=6, max_aliases=4, max_nodes=60, max_int_digits=8, max_issues=5)


def fragments(rng: random.Random) -> str:
    """Fragments of YAML syntax strung together; now and then a character YAML forbids."""
    text = "".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(0, 80)))
    if rng.random() < 0.05:
        at = rng.randint(0, len(text))
        text = text[:at] + rng.choice("\x00\x07\x1b\x7f") + text[at:]
    return text


def mutated(rng: random.Random, seed_text: str) -> str:
    """A real recipe with a few fragments put in, taken out or swapped."""
    chars = list(seed_text)
    for _ in range(rng.randint(1, 3)):
        at = rng.randrange(len(chars) + 1)
        what = rng.random()
        if what < 0.4:
            chars[at:at] = rng.choice(FRAGMENTS)
        elif what < 0.7:
            del chars[at : at + rng.randint(1, 5)]
        else:
            chars[at : at + 1] = rng.choice(FRAGMENTS)
    return "".join(chars)


def aliased(rng: random.Random) -> str:
    """Well-formed flow YAML, nested and full of anchors and aliases: the limits' own ground."""
    anchors: list[str] = []  # the anchors whose values are complete, which aliases may name
    names = itertools.count()

    def value(depth: int) -> str:
        roll = rng.random()
        if anchors and roll < 0.3:
            return "*" + rng.choice(anchors)
        if depth > 8 or roll < 0.5:
            return rng.choice(["1", "x", "true", "null", "'q'", "1234567"])
        anchor = f"n{next(names)}" if rng.random() < 0.5 else None
        items = [value(depth + 1) for _ in range(rng.randint(0, 4))]
        if rng.random() < 0.5:
            body = "[" + ", ".join(items) + "]"
        else:
            body = "{" + ", ".join(f"k{i}: {v}" for i, v in enumerate(items)) + "}"
        if anchor is None:
            return body
        anchors.append(anchor)  # after its items: an anchor inside its own value would be refused
        return f"&{anchor} {body}"

    return "\n".join(f"k{i}: {value(1)}" for i in range(rng.randint(1, 6))) + "\n"


def yamlish(rng: random.Random, seed_text: str) -> str:
    roll = rng.random()
    return fragments(rng) if roll < 0.4 else mutated(rng, seed_text) if roll < 0.7 else aliased(rng)


def _extent(value: Any, depth: int = 1) -> tuple[int, int]:
    """Values (keys included) and levels of parsed data, shared parts counted each time they appear."""
    if isinstance(value, dict):
        parts = [_extent(k, depth + 1) for k in value] + [_extent(v, depth + 1) for v in value.values()]
    elif isinstance(value, list):
        parts = [_extent(v, depth + 1) for v in value]
    else:
        return 1, depth
    return 1 + sum(n for n, _ in parts), max([depth, *(d for _, d in parts)])


def _check(text: str, registry: Registry) -> None:
    doc = parse_yaml_located(text, "f.yaml", TIGHT)
    assert all(isinstance(i, Issue) and i.file == "f.yaml" and i.message for i in doc.issues)
    assert all(i.line is None or 1 <= i.line <= text.count("\n") + 2 for i in doc.issues)
    if not doc.issues:
        values, levels = _extent(doc.data)
        assert values <= TIGHT.max_nodes and levels <= TIGHT.max_depth
    _, issues = validate_text(text, registry, "f.yaml", TIGHT)
    assert len(issues) <= TIGHT.max_issues + 1


@pytest.mark.parametrize("parser", ["default", "pure-python"])
def test_fuzzed_yaml_gives_located_issues_never_an_exception(monkeypatch, parser):
    if parser == "pure-python":
        monkeypatch.setattr(yamlio, "_Loader", yamlio._loader_class(yamlio._PyParser))
        monkeypatch.setattr(yamlio, "_LIBYAML", False)
    registry = Registry.load(get_settings().registry)
    seed_text = (ROOT / "recipes" / "lora_chat_sft.yaml").read_text(encoding="utf-8")
    rng = random.Random(20261130)
    deadline = time.monotonic() + 2
    tried = 0
    while tried < 2000 and time.monotonic() < deadline:
        text = yamlish(rng, seed_text)
        try:
            _check(text, registry)
        except Exception as exc:
            raise AssertionError(f"input {text!r} gave {type(exc).__name__}: {exc}") from exc
        tried += 1
    assert tried >= 200
