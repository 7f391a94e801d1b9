"""The benchmark scripts run end to end (tiny settings) and write their JSON, so they never rot."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_data_throughput_runs_and_records(tmp_path):
    out = tmp_path / "dt.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "data_throughput.py"), "--rows", "60", "--corpus-passages", "200",
           "--vocab", "2000", "--max-seq-len", "1024", "--workers", "1", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    [run] = result["runs"]
    assert result["machine"]["cores"] and result["settings"]["max_seq_len"] == 1024
    assert run["tokens"] > 0 and run["tokens_per_second"] > 0 and run["samples"] + run["dropped"] <= 60
    assert "tokens/s" in proc.stdout


def test_synthetic_data_is_deterministic():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from synthetic import chat_rows

    first, again = list(chat_rows(30, seed=3)), list(chat_rows(30, seed=3))
    assert first == again and first != list(chat_rows(30, seed=4))
    assert all(m["role"] in ("system", "user", "assistant") for row in first for m in row["messages"])


# ------------------------------------------------------------------------------ training throughput

RUN_KEYS = {
    "system",
    "model",
    "architecture",
    "size",
    "method",
    "seq_len",
    "packing",
    "micro_batch",
    "dtype",
    "params",
    "adapter_params",
    "attn_len",
    "model_flops_per_token",
    "hardware_flops_per_token",
    "tokens_per_s_per_gpu",
    "mfu",
    "hfu",
    "step_time_s",
    "steps_timed",
    "peak_memory_bytes",
    "loss_first",
    "loss_last",
    "grad_norm_min",
    "valid",
    "void_reason",
    "speedup_vs_baseline",
}


def _benchmarks_module(name):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import importlib

    return importlib.import_module(name)


def test_gpu_check_dry_run_trains_both_systems_and_writes_the_table(tmp_path):
    """The GPU script end to end on tiny models on CPU: smoke, throughput of ours and the baseline, table."""
    from finetune.flops import FORMULAS

    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "throughput-dryrun.json").read_text())
    assert result["benchmark"] == "throughput" and result["formulas"] == FORMULAS
    assert result["device"]["kind"] == "cpu" and result["device"]["peak_flops"] is None
    assert {"torch", "cuda", "transformers", "peft", "deepspeed"} <= result["versions"].keys()
    runs = result["runs"]
    pairs = [(r["model"], r["method"], r["system"]) for r in runs]
    assert pairs == [
        ("llama-3.2-1b-instruct", "full", "finetune"),
        ("llama-3.2-1b-instruct", "full", "hf-trainer"),
        ("llama-3.1-8b-instruct", "lora", "finetune"),
        ("llama-3.1-8b-instruct", "lora", "hf-trainer"),
    ]
    for r in runs:
        assert RUN_KEYS <= r.keys(), RUN_KEYS - r.keys()
        assert r["size"] == "tiny" and r["dtype"] == "fp32" and r["seq_len"] == 256 and r["steps_timed"] == 2
        assert r["tokens_per_s_per_gpu"] > 0 and r["step_time_s"] > 0 and r["mfu"] is None
        assert r["params"] > 0 and r["model_flops_per_token"] > 6 * r["params"] * (r["method"] == "full")
        assert r["valid"] == (r["void_reason"] is None)
    ours_lora, hf_lora = runs[2], runs[3]
    assert 0 < ours_lora["adapter_params"] == hf_lora["adapter_params"] < ours_lora["params"]  # same LoRA both sides
    assert runs[0]["adapter_params"] == 0 and runs[0]["packing"] and not runs[1]["packing"]
    page = (tmp_path / "RESULTS.md").read_text()
    assert "throughput-dryrun.json" in page and page.count("| hf-trainer |") == 2
    smoke = json.loads((tmp_path / "smoke-dryrun.json").read_text())
    assert [r["method"] for r in smoke["results"]] == ["lora", "full"]
    assert all(r["checks"]["first loss bf16 ~ fp32"] and r["grad_norm_min"] > 0 for r in smoke["results"])


def test_a_run_without_gradient_or_without_learning_is_void():
    throughput = _benchmarks_module("throughput")
    from bench_systems import Measured, Step

    def measured(losses, norms):
        steps = [Step(0.0, 0, float("nan"), float("nan"))]
        steps += [Step(float(i + 1), 100, loss, norm) for i, (loss, norm) in enumerate(zip(losses, norms, strict=True))]
        return Measured(steps=steps, params=10, layers=1, query_width=4, trainable=10, peak_memory_bytes=None)

    falling = [5.0, 4.9, 4.8, 4.6, 4.5, 4.3, 4.2, 4.0, 3.9]
    assert throughput.judge(measured(falling, [1.0] * 9), warmup=2)[:2] == (True, None)
    valid, reason, _ = throughput.judge(measured(falling, [1.0] * 5 + [0.0] + [1.0] * 3), warmup=2)
    assert not valid and "gradient norm" in reason and "[6]" in reason
    valid, reason, _ = throughput.judge(measured(falling[::-1], [1.0] * 9), warmup=2)
    assert not valid and "did not fall" in reason
    valid, reason, _ = throughput.judge(measured(falling[:2], [1.0] * 2), warmup=2)
    assert not valid and "none after" in reason
    figures = throughput.figures_of(
        measured(falling, [1.0] * 9), method="full", warmup=2, attn_len=8.0, recompute=False, peak=1e6
    )
    assert figures["steps_timed"] == 7 and figures["tokens_per_s_per_gpu"] == 100.0  # 100 tokens a second each step
    assert figures["model_flops_per_token"] == 6 * 10 + 12 * 1 * 4 * 8.0
    assert figures["mfu"] == round(100.0 * figures["model_flops_per_token"] / 1e6, 4)


def test_results_page_is_generated_from_the_recorded_results(tmp_path):
    table = _benchmarks_module("table")
    assert table.main(["--check"]) == 0, "benchmarks/RESULTS.md is stale: run python benchmarks/table.py"
    recorded = sorted((ROOT / "benchmarks" / "results").glob("throughput-*.json"))
    assert recorded, "no recorded throughput results"
    cpu = [json.loads(p.read_text()) for p in recorded if "-cpu-" in p.name]
    assert cpu, "no CPU figures recorded"
    for result in cpu:
        systems = {(r["method"], r["system"]) for r in result["runs"]}
        assert systems >= {("full", "finetune"), ("full", "hf-trainer"), ("lora", "finetune"), ("lora", "hf-trainer")}
    void = {**json.loads(recorded[0].read_text())}
    void["runs"] = [
        {**void["runs"][0], "valid": False, "void_reason": "the loss did not fall", "speedup_vs_baseline": None}
    ]
    (tmp_path / "throughput-x-20260101.json").write_text(json.dumps(void))
    page = table.render(tmp_path)
    assert "**void**: the loss did not fall" in page and "throughput-x-20260101.json" in page


def test_gather_wheels_lists_what_the_gpu_machine_lacks_without_network():
    script = ROOT / "scripts" / "gather_wheels.sh"
    env = {**os.environ, "PYTHON": sys.executable}
    listed = subprocess.run(["bash", str(script), "--list"], capture_output=True, text=True, env=env, timeout=60)
    assert listed.returncode == 0, listed.stderr
    pins = dict(line.split("==") for line in listed.stdout.split())
    import deepspeed
    import pydantic

    assert pins["deepspeed"] == deepspeed.__version__ and pins["pydantic"] == pydantic.VERSION
    assert {"pydantic-core", "pydantic-settings", "hjson", "cryptography"} <= pins.keys()
    assert not {"datasets", "pyarrow", "ray", "torch", "transformers"} & pins.keys()  # there already, or not needed
    dry = subprocess.run(["bash", str(script), "--dry-run"], capture_output=True, text=True, env=env, timeout=60)
    assert dry.returncode == 0, dry.stderr
    commands = dry.stdout.splitlines()
    downloads = [c for c in commands if " download " in c]
    assert len(downloads) == len(pins) - 1 and all("--only-binary=:all:" in c and "3.12" in c for c in downloads)
    [build] = [c for c in commands if " wheel " in c]
    assert "DS_BUILD_OPS=0" in build and f"deepspeed=={deepspeed.__version__}" in build
    assert "/.whl/" in (ROOT / ".gitignore").read_text().split()
