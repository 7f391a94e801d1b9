"""The benchmark scripts run end to end (tiny settings) and write their JSON, so they never rot."""

import json
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
