"""The whole data path: read, check, split, tokenise, pack, cache, report; on file:// and S3."""

import io
import json
import pickle
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from finetune.cli import main
from finetune.data.pipeline import DataError, prepare, split
from finetune.data.report import DataReport
from finetune.data.types import IGNORE_INDEX, PackedRow, RowProblem, Sample
from finetune.loading import ensure_tiny, load_tokenizer
from finetune.recipe import Recipe
from finetune.registry import Registry
from finetune.settings import get_settings
from finetune.storage import Bucket

ROOT = Path(__file__).resolve().parents[2]
MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    registry = Registry.load(get_settings().registry)
    return ensure_tiny(registry, MODEL, tmp_path_factory.mktemp("store"))


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return load_tokenizer(model_dir)


def chat(q: str, a: str) -> str:
    return json.dumps(
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}, ensure_ascii=False
    )


def make_recipe(**data) -> Recipe:
    return Recipe.model_validate(
        {"model": {"id": MODEL, "tiny": True}, "data": {"path": "data/train.jsonl", "max_seq_len": 256, **data}}
    )


def write(bucket_dir: Path, lines: list[str], name: str = "data/train.jsonl") -> None:
    path = bucket_dir / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


GOOD = [chat(f"問題 {i}：{i} 加 {i} 是多少？", f"答案是 {2 * i}。") for i in range(60)]


def test_prepare_packs_reports_and_caches(tmp_path, tokenizer, model_dir):
    write(tmp_path, GOOD)
    recipe, bucket, cache = make_recipe(eval={"fraction": 0.1}), Bucket.folder(tmp_path), tmp_path / "cache"
    first = prepare(recipe, bucket, tokenizer, model_dir=model_dir, cache_dir=cache, eot="<|im_end|>")
    report = first.report
    assert (report.rows_read, report.rows_used, report.problems_total) == (60, 60, 0)
    assert (report.train_samples, report.eval_samples) == (54, 6)
    assert report.format == "messages" and "messages" in report.format_reason
    assert all(isinstance(r, PackedRow) and len(r) <= 256 for r in first.train)
    assert sum(len(r) for r in first.train) == report.tokens_train
    assert 0 < report.packing_efficiency <= 1 and report.cache_hit is False
    assert "[[答案是" in report.sample and "<|im_end|>]]" in report.sample
    second = prepare(recipe, bucket, tokenizer, model_dir=model_dir, cache_dir=cache, eot="<|im_end|>")
    assert second.report.cache_hit and second.report.cache_key == report.cache_key
    assert [list(r["input_ids"]) for r in second.train] == [r.input_ids for r in first.train]
    write(tmp_path, GOOD[:-1])  # the data changed: the cache entry no longer applies
    third = prepare(recipe, bucket, tokenizer, model_dir=model_dir, cache_dir=cache, eot="<|im_end|>")
    assert not third.report.cache_hit and third.report.rows_read == 59


def test_bad_rows_are_skipped_within_the_allowance_and_fail_beyond_it(tmp_path, tokenizer):
    lines = GOOD + ['{"messages": [{"role": "user", "content": "no answer"}]}', GOOD[0], "{broken"]
    write(tmp_path, lines)
    ok = prepare(make_recipe(bad_rows={"max_fraction": 0.05}), Bucket.folder(tmp_path), tokenizer)
    assert ok.report.problems_total == 2 and ok.report.duplicates == 1 and ok.report.duplicates_policy == "drop"
    assert ok.report.rows_used == 60
    assert ok.report.problems == [  # in file order; the exact duplicate is dropped, not a bad row
        "data/train.jsonl:61: messages: no assistant turn",
        "data/train.jsonl:63: invalid JSON: Expecting property name enclosed in double quotes (column 2)",
    ]
    with pytest.raises(DataError) as exc:
        prepare(make_recipe(), Bucket.folder(tmp_path), tokenizer)
    assert exc.value.summary == (
        "2 of 62 distinct rows cannot be used and 3.2% of rows are bad, more than the 1.0% allowed; "
        "fix the rows listed, or change data.bad_rows"
    )
    assert [(i.file, i.line) for i in exc.value.issues] == [("data/train.jsonl", 61), ("data/train.jsonl", 63)]
    assert exc.value.report is not None and exc.value.report.rows_read == 63
    with pytest.raises(DataError, match="the bad-row policy is 'fail'"):
        prepare(make_recipe(bad_rows={"policy": "fail", "max_fraction": 0.5}), Bucket.folder(tmp_path), tokenizer)


def many_duplicates_and_five_bad() -> tuple[list[str], list[int]]:
    """100 rows: 35 distinct good ones, 60 exact repeats of them, then 5 bad rows (their lines returned)."""
    lines = GOOD[:35] + [GOOD[i % 35] for i in range(60)]
    lines += ['{"messages": [{"role": "user", "content": "no answer"}]}', "{broken", "[]", '{"messages": []}', "{"]
    return lines, list(range(96, 101))


def test_many_duplicates_do_not_hide_the_bad_rows(tmp_path, tokenizer):
    lines, bad_lines = many_duplicates_and_five_bad()
    write(tmp_path, lines)
    with pytest.raises(DataError) as exc:
        prepare(make_recipe(), Bucket.folder(tmp_path), tokenizer)
    assert [(i.file, i.line) for i in exc.value.issues] == [("data/train.jsonl", n) for n in bad_lines]
    assert exc.value.summary.startswith("5 of 40 distinct rows cannot be used and 12.5% of rows are bad")
    assert exc.value.report.duplicates == 60 and exc.value.report.problems_total == 5
    ok = prepare(make_recipe(bad_rows={"max_fraction": 0.2}), Bucket.folder(tmp_path), tokenizer)
    report = ok.report
    assert (report.rows_read, report.rows_used, report.problems_total, report.duplicates) == (100, 35, 5, 60)
    assert report.train_samples + report.eval_samples == 35


def test_duplicates_can_be_kept_or_refuse_the_dataset(tmp_path, tokenizer):
    write(tmp_path, GOOD[:10] + GOOD[:3] + GOOD[10:20])
    kept = prepare(make_recipe(duplicates="keep", packing=False), Bucket.folder(tmp_path), tokenizer)
    assert kept.report.rows_used == 23 and kept.report.duplicates == 3 and kept.report.problems_total == 0
    assert kept.report.duplicates_policy == "keep"
    with pytest.raises(DataError) as exc:
        prepare(make_recipe(duplicates="fail"), Bucket.folder(tmp_path), tokenizer)
    assert exc.value.summary.startswith("3 row(s) are exact duplicates of earlier rows and data.duplicates is 'fail'")
    assert [(i.file, i.line, i.message) for i in exc.value.issues] == [
        ("data/train.jsonl", 10 + n, f"exact duplicate of data/train.jsonl:{n}") for n in (1, 2, 3)
    ]


def test_a_refusal_holds_every_issue_and_the_message_stays_short(tmp_path, tokenizer):
    write(tmp_path, GOOD[:10] + ["{broken"] * 70)
    with pytest.raises(DataError) as exc:
        prepare(make_recipe(), Bucket.folder(tmp_path), tokenizer)
    assert [i.line for i in exc.value.issues] == list(range(11, 81))
    text = str(exc.value)
    assert "data/train.jsonl:60:" in text and "data/train.jsonl:61:" not in text and text.endswith("... and 20 more")
    again = pickle.loads(pickle.dumps(exc.value))
    assert again.issues == exc.value.issues and again.report.problems_total == 70 and str(again) == text


def test_summary_points_to_the_full_report_when_problems_are_cut(tmp_path):
    report = DataReport(dataset="d")
    report.add_problems([RowProblem(f"d.jsonl:{n}", "invalid JSON") for n in range(1, 31)])
    lines = report.summary_lines("/data/reports/r/data_report.json")
    assert "  d.jsonl:20: invalid JSON" in lines and "  d.jsonl:21: invalid JSON" not in lines
    assert "  ... and 10 more (see /data/reports/r/data_report.json)" in lines
    assert not any("more (see" in line for line in DataReport(dataset="d").summary_lines())
    path = report.save(tmp_path / "reports" / "r" / "data_report.json")
    assert json.loads(path.read_text(encoding="utf-8"))["problems_total"] == 30
    assert [p.name for p in path.parent.iterdir()] == ["data_report.json"]  # no temporary file left


def test_long_samples_follow_the_truncation_policy(tmp_path, tokenizer):
    long = chat("x " * 10, "很長的回答。" * 200)
    write(tmp_path, GOOD[:20] + [long])
    dropped = prepare(make_recipe(truncation="drop", packing=False), Bucket.folder(tmp_path), tokenizer)
    assert dropped.report.dropped == 1 and dropped.report.train_samples == 19
    cut = prepare(make_recipe(truncation="truncate", packing=False), Bucket.folder(tmp_path), tokenizer)
    assert cut.report.truncated == 1 and max(len(s) for s in cut.train) == 256
    with pytest.raises(DataError, match="longer than data.max_seq_len and data.truncation is 'fail'") as exc:
        prepare(make_recipe(truncation="fail"), Bucket.folder(tmp_path), tokenizer)
    assert [(i.file, i.line) for i in exc.value.issues] == [("data/train.jsonl", 21)]


def test_eval_file_and_deterministic_split(tmp_path, tokenizer):
    write(tmp_path, GOOD[:40])
    write(tmp_path, GOOD[40:], "data/eval.jsonl")
    prepared = prepare(make_recipe(eval={"path": "data/eval.jsonl"}), Bucket.folder(tmp_path), tokenizer)
    assert (prepared.report.train_samples, prepared.report.eval_samples) == (40, 20)
    assert prepared.report.eval_source == "file data/eval.jsonl"
    samples = [Sample(f"f:{i}", "text", text=str(i)) for i in range(100)]
    a, b = split(samples, 0.1, seed=7), split(samples, 0.1, seed=7)
    assert a == b and len(a[1]) == 10 and split(samples, 0.1, seed=8)[1] != a[1]


def test_missing_and_empty_datasets_are_located_errors(tmp_path, tokenizer):
    with pytest.raises(DataError, match="'data/train.jsonl' does not exist in your bucket"):
        prepare(make_recipe(), Bucket.folder(tmp_path), tokenizer)
    write(tmp_path, [""])
    with pytest.raises(DataError, match="holds no rows"):
        prepare(make_recipe(), Bucket.folder(tmp_path), tokenizer)


def test_dataset_from_an_s3_bucket(tmp_path, tokenizer, s3_storage):
    bucket = Bucket(s3_storage(), "t1", "2026q1")
    bucket.write_bytes("data/train.jsonl", ("\n".join(GOOD[:30]) + "\n").encode())
    prepared = prepare(make_recipe(), bucket, tokenizer, scratch=tmp_path / "scratch")
    assert prepared.report.rows_used == 30


def test_unpacked_rows_keep_labels_and_the_operator_view_has_no_content(tmp_path, tokenizer):
    write(tmp_path, GOOD[:10])
    prepared = prepare(make_recipe(packing=False, eval={"fraction": 0}), Bucket.folder(tmp_path), tokenizer)
    assert all(any(label != IGNORE_INDEX for label in s.labels) for s in prepared.train)
    ops = prepared.report.for_operators()
    assert "sample" not in ops and "problems" not in ops and "答案" not in json.dumps(ops, ensure_ascii=False)


def test_cli_inspect_quickstart_json(tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_DATA_DIR", str(tmp_path))
    out = io.StringIO()
    with redirect_stdout(out):
        code = main(["data", "inspect", str(ROOT / "recipes" / "quickstart.yaml"), "--json"])
    report = json.loads(out.getvalue())
    assert code == 0
    assert report["rows_read"] == report["rows_used"] == 52
    assert report["format"] == "messages" and report["packing"] is True
    assert report["packing_efficiency"] > 0.5 and report["histogram"]
    saved = tmp_path / "reports" / "quickstart" / "data_report.json"
    assert json.loads(saved.read_text(encoding="utf-8")) == report


def test_cli_inspect_text_names_the_full_report_and_refusals_keep_a_partial_one(tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_DATA_DIR", str(tmp_path / "data"))
    bucket = tmp_path / "bucket"
    write(bucket, GOOD + ["{broken"] * 30)
    recipe = bucket / "many_bad.yaml"
    recipe.write_text(json.dumps({"model": {"id": MODEL, "tiny": True}, "data": {"path": "data/train.jsonl"}}))
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(["data", "inspect", str(recipe)])
    path = tmp_path / "data" / "reports" / "many_bad" / "data_report.json"
    assert code == 2 and out.getvalue() == "" and f"as far as it got, is in {path}" in err.getvalue()
    saved = json.loads(path.read_text(encoding="utf-8"))
    assert saved["problems_total"] == len(saved["problems"]) == 30 and saved["rows_used"] == 0
    recipe.write_text(recipe.read_text().replace('"}}', '", "bad_rows": {"max_fraction": 0.5}}}'))
    with redirect_stdout(out):
        assert main(["data", "inspect", str(recipe)]) == 0
    assert f"  ... and 10 more (see {path})" in out.getvalue().splitlines()
    assert json.loads(path.read_text(encoding="utf-8"))["rows_used"] == 60


def test_a_recipe_without_eval_data_is_cached_and_read_back(tmp_path, tokenizer, model_dir):
    write(tmp_path, GOOD[:12])
    recipe, cache = make_recipe(eval={"fraction": 0}), tmp_path / "cache"
    first = prepare(recipe, Bucket.folder(tmp_path), tokenizer, model_dir=model_dir, cache_dir=cache)
    again = prepare(recipe, Bucket.folder(tmp_path), tokenizer, model_dir=model_dir, cache_dir=cache)
    assert again.report.cache_hit and len(again.eval) == 0 and len(again.train) == len(first.train)
