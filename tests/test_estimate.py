"""The estimator: its arithmetic, the throughput table, the command line, and its predictions of real runs.

The acceptance test trains tiny models on this machine's CPU with the real engine: a calibration
recipe before and after a different target recipe (the two calibration runs bracket the target,
so a machine whose load drifts meets the estimate with the average of both). The calibration runs
become a ``throughput-cpu-*.json`` results file; the estimator, given only that file and the
target recipe, predicts the target's training span (the ``start`` to ``end`` events of its
events), which is then compared with what the target run measured.
"""

from __future__ import annotations

import io
import json
import math
import re
import statistics
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune.cli import build_parser, main
from finetune.errors import RecipeError
from finetune.estimate import DEVICE_CHOICES, Allowances, device_for
from finetune.estimate import estimate_recipe as _estimate
from finetune.estimate.devices import GPU_MEMORY
from finetune.estimate.table import Query, find_measurement, read_table
from finetune.estimate.timing import count_checkpoints, count_evaluations, throughput_for
from finetune.flops import PEAK_BF16, attention_length, flops_per_token, shape_from_config
from finetune.registry import Registry
from finetune.settings import Settings


def estimate_recipe(path: Path, settings: Settings, *, registry: Registry, **options: Any) -> Any:
    """The estimate of a recipe file, as the command line makes it (file loaded here, bucket its folder)."""
    from finetune.storage import Bucket
    from finetune.validate import load_recipe

    recipe = load_recipe(path, registry)
    return _estimate(recipe, Bucket.folder(path.parent), settings, registry=registry, label=str(path), **options)


ROOT = Path(__file__).resolve().parents[1]
TINY = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def registry() -> Registry:
    return Registry.load(Settings().registry)


@pytest.fixture(scope="module")
def shared_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One data folder for the module: the tiny model and the data cache are built once."""
    return tmp_path_factory.mktemp("estimate-data")


@pytest.fixture
def settings(shared_data: Path) -> Settings:
    return Settings(data_dir=shared_data)


def recipe_file(folder: Path, name: str = "recipe", copies: int = 1, **changes: Any) -> Path:
    """The quick-start recipe with ``changes`` per section, over ``copies`` variants of its data."""
    doc = yaml.safe_load((ROOT / "recipes" / "quickstart.yaml").read_text())
    for section, values in changes.items():
        doc[section] = {**doc.get(section, {}), **values} if isinstance(values, dict) else values
    doc["data"]["path"] = f"data/{name}.jsonl"
    rows = [json.loads(line) for line in (ROOT / "recipes" / "data" / "quickstart.jsonl").read_text().splitlines()]
    lines = []
    for k in range(copies):  # distinct variants: exact duplicates would be refused
        for row in rows:
            messages = [{**m, "content": m["content"] + (f" ({k})" if k else "")} for m in row["messages"]]
            lines.append(json.dumps({"messages": messages}, ensure_ascii=False))
    (folder / "data").mkdir(parents=True, exist_ok=True)
    (folder / "data" / f"{name}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8")
    return path


def record(**changes: Any) -> dict[str, Any]:
    """A valid run of the results format."""
    run = {
        "system": "finetune", "model": "llama-3.1-8b-instruct", "architecture": "llama", "size": "full",
        "method": "lora", "seq_len": 2048, "packing": True, "micro_batch": 1, "dtype": "bf16", "params": 7_504_924_672,
        "adapter_params": 41_943_040, "attn_len": 500.0, "model_flops_per_token": 3.1e10,
        "hardware_flops_per_token": 4.6e10, "tokens_per_s_per_gpu": 5000.0, "mfu": 0.157, "hfu": 0.23,
        "step_time_s": 0.4, "steps_timed": 20, "peak_memory_bytes": None, "loss_first": 2.0, "loss_last": 1.5,
        "grad_norm_min": 0.1, "valid": True, "void_reason": None, "speedup_vs_baseline": None,
    }  # fmt: skip
    run.update(changes)
    return run


def write_results(folder: Path, kind: str, date: str, runs: list[dict[str, Any]], name: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    doc = {
        "benchmark": "throughput",
        "date": date,
        "device": {"name": kind.upper(), "kind": kind, "count": 1, "peak_flops": PEAK_BF16.get(kind)},
        "versions": {},
        "settings": {},
        "formulas": {},
        "runs": runs,
    }
    path = folder / (name or f"throughput-{kind}-{date.replace('-', '')}.json")
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path


def cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


# ------------------------------------------------------------------------------------ the table

QUERY = Query("h100-sxm", "llama-3.1-8b-instruct", "llama", "full", "lora", "bf16", 2048, 1, True)


def test_the_table_prefers_the_same_model_then_the_nearest_length_then_the_newest(tmp_path):
    write_results(tmp_path, "h100-sxm", "2026-10-01", [
        record(tokens_per_s_per_gpu=1.0),                                    # exact but older
        record(model="taide-llama3.1-8b-chat", tokens_per_s_per_gpu=2.0),    # same architecture only
    ])  # fmt: skip
    write_results(tmp_path, "h100-sxm", "2026-11-01", [
        record(tokens_per_s_per_gpu=3.0),                                    # exact, newest: chosen
        record(seq_len=4096, tokens_per_s_per_gpu=4.0),                      # farther length
        record(system="hf-trainer", tokens_per_s_per_gpu=5.0),               # not our engine
        record(valid=False, void_reason="loss did not fall", tokens_per_s_per_gpu=6.0),
        record(method="full", tokens_per_s_per_gpu=7.0),                     # another method
        record(dtype="fp32", tokens_per_s_per_gpu=8.0),
    ])  # fmt: skip
    write_results(tmp_path, "h200", "2026-12-01", [record(tokens_per_s_per_gpu=9.0)])  # another device
    table = read_table(tmp_path, "h100-sxm")
    chosen = find_measurement(table, QUERY)
    assert chosen is not None and chosen.tokens_per_s == 3.0 and chosen.match == "same model" and not chosen.differences
    assert chosen.date == "2026-11-01" and chosen.file.endswith("throughput-h100-sxm-20261101.json")
    # no run of the model itself at this length: the nearest length by ratio wins over the newest
    table.runs = [r for r in table.runs if r[3]["tokens_per_s_per_gpu"] not in (1.0, 3.0)]
    chosen = find_measurement(table, QUERY)
    assert chosen is not None and chosen.tokens_per_s == 4.0
    assert chosen.differences == ("sequence length (4096, job 2048)",)
    # no run of the model at all: the same architecture
    table.runs = [r for r in table.runs if r[3]["model"] != "llama-3.1-8b-instruct"]
    chosen = find_measurement(table, QUERY)
    assert chosen is not None and chosen.tokens_per_s == 2.0 and chosen.match == "same architecture"


def test_the_table_never_mixes_size_classes_and_reports_bad_files(tmp_path):
    write_results(tmp_path, "cpu", "2026-11-01", [record(size="tiny", dtype="fp32"), {"system": "finetune"}])
    (tmp_path / "throughput-cpu-broken.json").write_text("{not json", encoding="utf-8")
    table = read_table(tmp_path, "cpu")
    assert len(table.runs) == 1
    assert any("runs[1]: 'model' missing" in s for s in table.skipped)
    assert any("throughput-cpu-broken.json: not a throughput result" in s for s in table.skipped)
    cpu_full = Query("cpu", "llama-3.1-8b-instruct", "llama", "full", "lora", "fp32", 2048, 1, True)
    assert find_measurement(table, cpu_full) is None  # a tiny run never stands for a full-size model
    assert find_measurement(table, Query(**{**cpu_full.__dict__, "size": "tiny"})) is not None
    assert read_table(tmp_path / "absent", "cpu").skipped == [f"no results folder at {tmp_path / 'absent'}"]


# ------------------------------------------------------------------------------------ the arithmetic


def test_a_measurement_is_scaled_by_hardware_flops_per_token(tmp_path):
    write_results(tmp_path, "h100-sxm", "2026-11-01", [record()])
    measured = find_measurement(read_table(tmp_path, "h100-sxm"), QUERY)
    device = device_for("h100")
    same = throughput_for(measured, device, "lora", 4.6e10, Allowances(), missing="-")
    assert same.source == "measured" and same.tokens_per_s == pytest.approx(5000.0)
    assert same.flops_per_s == pytest.approx(5000.0 * 4.6e10) and "scaled" not in same.note
    twice = throughput_for(measured, device, "lora", 9.2e10, Allowances(), missing="-")
    assert twice.tokens_per_s == pytest.approx(2500.0) and "scaled x0.500 by hardware FLOPs per token" in twice.note


def test_without_a_measurement_a_gpu_gets_the_stated_utilisation_and_a_cpu_gets_none():
    h100 = device_for("h100")
    for method, share in (("full", 0.40), ("lora", 0.30), ("qlora", 0.20)):
        got = throughput_for(None, h100, method, 1e10, Allowances(), missing="nothing recorded")
        assert got.source == "assumed" and got.tokens_per_s == pytest.approx(share * 989.4e12 / 1e10)
        assert f"{share:.0%} of the h100-sxm bf16 peak" in got.note and "nothing recorded" in got.note
    cpu = throughput_for(None, device_for("cpu"), "full", 1e6, Allowances(), missing="nothing recorded")
    assert cpu.source == "none" and cpu.tokens_per_s is None
    assert "cannot estimate the time" in cpu.note and "a CPU has no peak FLOP/s" in cpu.note
    tiny = throughput_for(None, h100, "full", 1e6, Allowances(), missing="-", tiny=True)
    assert tiny.source == "none" and "per-step overheads" in tiny.note


def test_evaluations_and_checkpoints_are_counted_as_the_loop_makes_them():
    assert count_evaluations(40, 4, True) == 10
    assert count_evaluations(10, 4, True) == 3  # steps 4 and 8, then after the last
    assert count_evaluations(10, 4, False) == 0 and count_evaluations(10, 0, True) == 0
    assert count_checkpoints(36, 9, 1800.0, 0.1, 0.0) == 4  # steps 9, 18, 27, 36
    assert count_checkpoints(37, 9, 1800.0, 0.1, 0.0) == 5  # ... and after the last
    assert count_checkpoints(100, 0, 1800.0, 0.1, 0.0) == 1  # 10 s of steps: only the last
    assert count_checkpoints(1000, 0, 60.0, 1.0, 0.0) == 17  # by time: 16 intervals of 60 s, then the last
    assert count_checkpoints(1000, 500, 60.0, 1.0, 0.0) == 17  # time comes first when steps are slower


def test_devices():
    assert set(DEVICE_CHOICES) == {"h100", "h100-sxm", "h100-pcie", "h200", "cpu"}
    parser_choices = next(a for a in build_parser()._actions if a.dest == "command").choices["estimate"]  # type: ignore[union-attr]
    gpu = next(a for a in parser_choices._actions if a.dest == "gpu")
    assert list(gpu.choices) == list(DEVICE_CHOICES) and gpu.default == "h100"
    assert device_for("h100") == device_for("h100-sxm") and device_for("h100").memory_bytes == GPU_MEMORY["h100-sxm"]
    assert device_for("h100-pcie").peak_flops == PEAK_BF16["h100-pcie"] < device_for("h200").peak_flops  # type: ignore[operator]
    cpu = device_for("cpu")
    assert cpu.peak_flops is None and not cpu.is_gpu and cpu.memory_bytes > 0
    with pytest.raises(ValueError, match="unknown device 'a100'"):
        device_for("a100")


def test_the_results_folder_is_a_setting(monkeypatch, tmp_path):
    assert Settings().benchmark_results == ROOT / "benchmarks" / "results"
    monkeypatch.setenv("FINETUNE_BENCHMARK_RESULTS", str(tmp_path))
    assert Settings().benchmark_results == tmp_path


# ------------------------------------------------------------------------------------ whole estimates


def test_a_tiny_recipe_on_cpu_tokens_flops_and_time_from_its_own_data(tmp_path, settings, registry):
    from finetune.data.pipeline import prepare
    from finetune.loading import load_tokenizer, model_folder
    from finetune.storage import Bucket
    from finetune.validate import load_recipe

    path = recipe_file(tmp_path, training={"epochs": 3})
    write_results(tmp_path / "results", "cpu", "2026-11-01", [
        record(model=TINY, size="tiny", method="full", seq_len=256, micro_batch=4, dtype="fp32",
               model_flops_per_token=1.0e6, hardware_flops_per_token=1.0e6, tokens_per_s_per_gpu=10_000.0),
    ])  # fmt: skip
    est = estimate_recipe(path, settings, registry=registry, device="cpu", results=tmp_path / "results")

    # tokens: what `finetune data inspect` reports, through the plan of finetune.train.plan
    recipe = load_recipe(path, registry)
    folder = model_folder(recipe, registry, settings.store_path)
    prepared = prepare(recipe, Bucket.folder(tmp_path), load_tokenizer(folder), model_dir=folder)
    report = prepared.report
    assert est.data.tokens_per_epoch == report.tokens_train and est.data.rows == report.packed_rows_train
    assert est.data.eval_tokens == report.tokens_eval
    assert est.data.trained_tokens_per_epoch == report.trained_tokens_train
    steps_per_epoch = math.ceil(report.packed_rows_train / 4)
    assert est.plan.steps_per_epoch == steps_per_epoch and est.plan.total_steps == 3 * steps_per_epoch
    assert est.plan.tokens == pytest.approx(3 * steps_per_epoch * 4 * report.tokens_train / report.packed_rows_train)

    # FLOPs: the formulas of finetune.flops, T from the packed document lengths, the tiny config that runs
    from transformers import AutoConfig

    shape = shape_from_config(AutoConfig.from_pretrained(folder))
    attn = attention_length([n for row in prepared.train for n in row.doc_lengths])
    model_fl, hardware_fl = flops_per_token(shape, "full", attn)
    assert est.model.matrix_params == shape.params and est.data.attn_len == pytest.approx(attn, abs=0.01)
    assert est.flops.model_per_token == pytest.approx(model_fl) and est.flops.hardware_per_token == hardware_fl
    assert est.flops.model_total == pytest.approx(model_fl * est.plan.tokens)

    # time: the measured run scaled by FLOPs per token; a CPU holds no GPU, so no points
    assert est.throughput.source == "measured"
    assert est.throughput.tokens_per_s == pytest.approx(10_000.0 * 1.0e6 / hardware_fl)
    t = est.timing
    assert t is not None and t.train_s == pytest.approx(est.plan.tokens / est.throughput.tokens_per_s)
    assert t.evaluations == 3 and t.checkpoints == 1 and t.span_s == t.train_s + t.eval_s + t.checkpoint_s + t.final_s
    startup = 60.0 + t.startup_parts["model load"] + t.startup_parts["data preparation"]
    assert t.wall_s == pytest.approx(t.span_s + startup)
    assert est.gpu_hours is None and est.points is None
    assert est.memory.zero_stage == 0 and est.memory.fits and est.model.dtype == "fp32"


def test_points_are_gpus_times_wall_time_over_half_an_hour(tmp_path, settings, registry):
    path = recipe_file(tmp_path, resources={"gpus": 2})
    write_results(tmp_path / "results", "h100-sxm", "2026-11-01", [
        record(model=TINY, size="tiny", method="full", seq_len=256, micro_batch=4, tokens_per_s_per_gpu=50_000.0),
    ])  # fmt: skip
    est = estimate_recipe(path, settings, registry=registry, device="h100", results=tmp_path / "results")
    assert est.timing is not None and est.plan.gpus == 2 and est.model.dtype == "bf16"
    assert est.timing.startup_parts["fixed"] == 300.0
    assert est.gpu_hours == pytest.approx(2 * est.timing.wall_s / 3600)
    assert est.points == pytest.approx(2 * est.timing.wall_s / 1800)
    assert est.memory.zero_stage == 2  # several GPUs: ZeRO-2 when it fits
    assert any("2 GPUs keep the per-GPU throughput" in a for a in est.assumptions)


def test_a_full_size_model_gives_sane_numbers_without_weights(tmp_path, settings, registry):
    path = recipe_file(
        tmp_path, model={"id": "llama-3.1-8b-instruct", "tiny": False}, data={"max_seq_len": 2048},
        method={"type": "lora"}, output={"archive": "adapter"},
        training={"learning_rate": 2e-4, "gradient_checkpointing": True},
    )  # fmt: skip
    est = estimate_recipe(path, settings, registry=registry, device="h100", results=tmp_path / "none")
    m = est.model
    assert m.size == "full" and m.params == 8_030_261_248 and m.matrix_params == 7_504_924_672
    assert m.adapter_params == m.trainable_params == 41_943_040  # rank 16 on the 7 projections of 32 layers
    assert (m.layers, m.hidden, m.query_width, m.vocab) == (32, 4096, 4096, 128256)
    assert 4 * m.matrix_params < est.flops.model_per_token < 4.2 * m.matrix_params
    assert est.flops.recompute and est.flops.hardware_per_token > est.flops.model_per_token
    assert est.throughput.source == "assumed"  # nothing recorded: 30% of the H100's peak
    assert 2_000 < est.throughput.tokens_per_s < 20_000  # type: ignore[operator]
    assert est.timing is not None and 300 < est.timing.wall_s < 600 and 0 < est.points < 1  # type: ignore[operator]
    assert est.memory.zero_stage == 0 and est.memory.fits and 15 < est.memory.per_gpu / 1024**3 < 40
    assert any("stand-in tokenizer" in a for a in est.assumptions)
    assert any("no results folder" in w for w in est.warnings)
    # the same model fully fine-tuned does not fit one H100 at any stage: said, with what to do
    full = recipe_file(tmp_path, "full", model={"id": "llama-3.1-8b-instruct", "tiny": False}, method={"type": "full"})
    est = estimate_recipe(full, settings, registry=registry, device="h100", results=tmp_path / "none")
    assert not est.memory.fits and est.memory.zero_stage == 3 and "set resources.offload" in est.memory.reason
    assert est.memory.per_gpu > 16 * 8_000_000_000  # 16 bytes a parameter before activations
    # a bigger GPU: the same job in less time, more memory
    h200 = estimate_recipe(full, settings, registry=registry, device="h200", results=tmp_path / "none")
    pcie = estimate_recipe(full, settings, registry=registry, device="h100-pcie", results=tmp_path / "none")
    assert pcie.timing.train_s > est.timing.train_s == pytest.approx(h200.timing.train_s)  # type: ignore[union-attr]
    assert h200.memory.device_memory > est.memory.device_memory


def test_qlora_on_cpu_is_refused_as_the_engine_refuses_it(tmp_path, settings, registry):
    path = recipe_file(tmp_path, method={"type": "qlora"}, output={"archive": "adapter"})
    with pytest.raises(RecipeError, match="cannot run on cpu") as exc:
        estimate_recipe(path, settings, registry=registry, device="cpu")
    assert [i.path for i in exc.value.issues] == ["method.type"]
    est = estimate_recipe(path, settings, registry=registry, device="h100", results=tmp_path / "none")
    assert est.timing is None and "cannot estimate" in est.throughput.note  # a tiny model, nothing measured


# ------------------------------------------------------------------------------------ command line


def test_cli_human_and_json(tmp_path, shared_data, monkeypatch):
    monkeypatch.setenv("FINETUNE_DATA_DIR", str(shared_data))
    path = recipe_file(tmp_path, training={"epochs": 2})
    results = tmp_path / "results"
    write_results(results, "cpu", "2026-11-01", [
        record(model=TINY, size="tiny", method="full", seq_len=256, micro_batch=4, dtype="fp32",
               model_flops_per_token=1.0e6, hardware_flops_per_token=1.0e6, tokens_per_s_per_gpu=10_000.0),
    ])  # fmt: skip
    code, out, err = cli("estimate", str(path), "--gpu", "cpu", "--results", str(results))
    assert code == 0, err
    heads = ("model ", "data ", "plan ", "tokens ", "FLOPs ", "throughput ", "time ", "cost ", "memory ", "assumptions")
    for head in heads:
        assert any(line.startswith(head) for line in out.splitlines()), head
    assert "measured: throughput-cpu-20261101.json" in out and "start-up allowance" in out
    assert "no GPU held: no points" in out and "ZeRO-0" in out
    code, out, _ = cli("estimate", str(path), "--gpu", "cpu", "--results", str(results), "--json")
    data = json.loads(out)
    assert code == 0 and data["device"]["kind"] == "cpu" and data["throughput"]["source"] == "measured"
    assert data["time"]["span_s"] > 0 and data["points"] is None and data["assumptions"]
    assert data["plan"]["total_steps"] == 2 * data["plan"]["steps_per_epoch"]


def test_cli_cannot_estimate_on_cpu_without_a_measurement(tmp_path, shared_data, monkeypatch):
    monkeypatch.setenv("FINETUNE_DATA_DIR", str(shared_data))
    path = recipe_file(tmp_path)
    code, out, _ = cli("estimate", str(path), "--gpu", "cpu", "--results", str(tmp_path / "empty"))
    assert code == 1
    assert "time           cannot estimate" in out and "a CPU has no peak FLOP/s" in out
    assert "tokens " in out and "memory " in out  # what can be known is still reported
    code, out, _ = cli("estimate", str(path), "--gpu", "cpu", "--results", str(tmp_path / "empty"), "--json")
    data = json.loads(out)
    assert code == 1 and data["time"] is None and data["throughput"]["source"] == "none"
    assert data["points"] is None and data["flops"]["model_total"] > 0


def test_cli_invalid_recipe_exits_2_with_located_issues(tmp_path, shared_data, monkeypatch):
    monkeypatch.setenv("FINETUNE_DATA_DIR", str(shared_data))
    path = recipe_file(tmp_path, data={"max_seq_len": 10}, training={"epochs": 0})
    code, out, err = cli("estimate", str(path))
    assert code == 2 and out == ""
    assert re.search(rf"{re.escape(str(path))}:\d+: data\.max_seq_len: must be at least 64 \(got 10\)", err), err
    assert re.search(rf"{re.escape(str(path))}:\d+: training\.epochs: ", err), err


# ------------------------------------------------------------------------------------ prediction of real runs


def train(recipe: Path, settings: Settings, registry: Registry, job: Path) -> list[Any]:
    """Run the real engine in this process (one worker); return its events."""
    from finetune.events import read_events
    from finetune.jobstore import JobStore
    from finetune.storage import Bucket
    from finetune.train.launch import launch, plan_job
    from finetune.validate import load_recipe

    store = JobStore.folder(job)
    spec, _ = plan_job(load_recipe(recipe, registry), Bucket.folder(recipe.parent), store, settings, registry=registry)
    launch(spec, "local", settings)
    return read_events(store.bucket, store.prefix)


def calibration_row(records: list[Any], recipe: Path, settings: Settings, registry: Registry) -> dict:
    """A results-format run from a training run's events: its steps after the first, timed by the loop."""
    from transformers import AutoConfig

    from finetune.prepare import prepare_job
    from finetune.storage import Bucket
    from finetune.validate import load_recipe

    r = load_recipe(recipe, registry)
    job = prepare_job(r, Bucket.folder(recipe.parent), settings, registry=registry)
    assert job.model.folder is not None
    attn = attention_length([n for row in job.train_rows for n in row.doc_lengths])
    shape = shape_from_config(AutoConfig.from_pretrained(job.model.folder))
    model_fl, hardware_fl = flops_per_token(shape, r.method.type, attn, recompute=r.training.gradient_checkpointing)
    steps = [x for x in records if x.kind == "step"][1:]
    losses = [x.loss for x in steps]
    return record(
        model=TINY, architecture="llama", size="tiny", method=r.method.type, seq_len=r.data.max_seq_len,
        packing=r.data.packing, micro_batch=r.training.micro_batch_size, dtype="fp32", params=shape.params,
        adapter_params=0, attn_len=round(attn, 2), model_flops_per_token=model_fl, hardware_flops_per_token=hardware_fl,
        tokens_per_s_per_gpu=sum(x.tokens for x in steps) / sum(x.step_time for x in steps), mfu=None, hfu=None,
        step_time_s=statistics.median(x.step_time for x in steps), steps_timed=len(steps),
        peak_memory_bytes=max(x.peak_memory for x in steps), loss_first=losses[0], loss_last=losses[-1],
        grad_norm_min=min(x.grad_norm for x in steps), valid=losses[-1] < losses[0],
    )  # fmt: skip


def span(records: list[Any]) -> float:
    """Seconds from the ``start`` event to the ``end`` event of a run."""
    events = {x.kind: x.time for x in records if x.kind in ("start", "end")}
    return float(events["end"] - events["start"])


def check_counts(est: Any, measured: list[Any], job: Path) -> None:
    """The counts of a prediction are exact; the tokens differ only by the rows that fill each epoch's last step."""
    t = est.timing
    assert t is not None and est.throughput.source == "measured"
    steps = [x for x in measured if x.kind == "step"]
    assert est.plan.total_steps == len(steps)
    assert t.evaluations == len([x for x in measured if x.kind == "eval"])
    assert t.checkpoints == len([x for x in measured if x.kind == "checkpoint"])
    assert est.plan.tokens == pytest.approx(sum(x.tokens for x in steps), rel=0.05)


def predict_two_targets(folder: Path, settings: Settings, registry: Registry) -> tuple[float, list[float], list[str]]:
    """Calibration runs before, between and after two target runs; each target predicted from the two around it.

    Returns the error of both targets' spans together, each target's error, and the figures.
    """
    calibration = recipe_file(folder / "cal", "calibration", copies=2, training={"epochs": 4})
    targets = [
        recipe_file(
            folder / "a", "target-a", copies=3, data={"eval": {"fraction": 0.15}},
            training={"epochs": 4, "eval_every_steps": 6, "save_every_steps": 9}, output={"keep_checkpoints": 20},
        ),
        recipe_file(
            folder / "b", "target-b", copies=4, data={"eval": {"fraction": 0.05}},
            training={"epochs": 2, "gradient_accumulation_steps": 2},
        ),
    ]  # fmt: skip
    cals = [calibration_row(train(calibration, settings, registry, folder / "cal-0"), calibration, settings, registry)]
    runs = []
    for i, target in enumerate(targets):
        runs.append(train(target, settings, registry, folder / f"job-{target.stem}"))
        cal = train(calibration, settings, registry, folder / f"cal-{i + 1}")
        cals.append(calibration_row(cal, calibration, settings, registry))
    assert all(c["valid"] for c in cals)
    predicted = actual = 0.0
    errors, lines = [], []
    for i, (target, measured) in enumerate(zip(targets, runs, strict=True)):
        rate = statistics.fmean(c["tokens_per_s_per_gpu"] for c in cals[i : i + 2])
        results = folder / f"results-{i}"
        write_results(results, "cpu", "2026-11-27", [dict(cals[i], tokens_per_s_per_gpu=rate)])
        est = estimate_recipe(target, settings, registry=registry, device="cpu", results=results)
        check_counts(est, measured, folder / f"job-{target.stem}")
        t = est.timing
        assert t is not None
        p, a = t.span_s, span(measured)
        predicted, actual = predicted + p, actual + a
        errors.append(p / a - 1)
        steps = sum(x.step_time for x in measured if x.kind == "step")
        lines.append(
            f"{target.stem}: predicted {p:.2f} s (steps {t.train_s:.2f} + {t.evaluations} evals {t.eval_s:.2f} + "
            f"{t.checkpoints} checkpoints {t.checkpoint_s:.2f} + final {t.final_s:.2f}), measured {a:.2f} s "
            f"(steps {steps:.2f}): {errors[-1]:+.1%}; calibrations around it "
            + " and ".join(f"{c['tokens_per_s_per_gpu']:,.0f}" for c in cals[i : i + 2])
            + " tokens/s"
        )
    lines.append(f"both: predicted {predicted:.2f} s, measured {actual:.2f} s: {predicted / actual - 1:+.1%}")
    return predicted / actual - 1, errors, lines


@pytest.mark.integration
def test_cpu_tiny_runs_wall_time_is_predicted_within_25_percent(tmp_path, settings, registry, one_thread):
    """Calibrate on one recipe, predict two others (more data, other epochs, accumulation, eval and checkpoints).

    Predicted: each target's training span, from the ``start`` to the ``end`` event of its
    events (every step, the evaluations, the checkpoints and the final model). Its start-up
    (imports, data preparation, model load, DeepSpeed initialisation) is outside that span; the
    estimate covers it with a stated allowance that this test does not judge.

    The speed of a shared virtual machine drifts within seconds (the host's other tenants; it
    shows in the process's CPU time too, so CPU time cannot factor it out). So calibration runs
    go before, between and after the targets, each target is predicted from the two runs around
    it, the 25% bound holds for each target (and for both together), and an attempt spoilt by a
    burst of load is tried once more: an estimator that is wrong fails both.
    """
    report = []
    for attempt in (1, 2):
        total, each, lines = predict_two_targets(tmp_path / f"attempt-{attempt}", settings, registry)
        report += [f"attempt {attempt}:"] + [f"  {line}" for line in lines]
        if abs(total) <= 0.25 and all(abs(e) <= 0.25 for e in each):
            break
    print("\n".join(report))
    assert abs(total) <= 0.25 and all(abs(e) <= 0.25 for e in each), "\n".join(report)
