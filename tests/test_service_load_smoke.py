"""The service load benchmark end to end on tiny sizes (SQLite): it builds, serves, loads and records
its JSON. No timing is asserted: the figures belong to benchmarks/results/, not to a test."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.integration
def test_service_load_runs_and_records(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import service_load

    tiny = ["--tenants", "2", "--jobs", "8", "--events", "120", "--clients", "3", "--hot-streamers", "1"]
    brief = ["--seconds", "2", "--stream-seconds", "0.5", "--write-rate", "20", "--calibrate", "5", "--warmup", "0.5"]
    assert service_load.main(["--db", "sqlite", *tiny, *brief, "--results", str(tmp_path)]) == 0

    [path] = tmp_path.glob("service-load-sqlite-*.json")
    result = json.loads(path.read_text(encoding="utf-8"))
    assert {"device", "database_version", "sizes", "settings", "build_seconds", "queries", "runs"} <= result.keys()
    assert result["device"]["cores"] and result["device"]["cpu"]
    sizes = result["sizes"]
    assert (sizes["tenants"], sizes["jobs"], sizes["events"]) == (2, 8, 120)
    assert sum(result["sizes"]["job_states"].values()) == 8
    assert all(q["plan"] and q["p50_ms"] is not None for q in result["queries"].values())
    [run] = result["runs"]
    assert run["app"] == "service" and set(run["operations"]) == {"list_jobs", "get_job", "list_events", "stream"}
    for figures in run["operations"].values():
        assert {"count", "per_s", "p50_ms", "p99_ms", "max_ms", "errors"} <= figures.keys()
    assert sum(f["count"] for f in run["operations"].values()) > 0
    sse = run["sse"]
    assert {"written", "delivered", "p50_ms", "p99_ms", "max_ms", "later_than_1s", "never_delivered"} <= sse.keys()
    assert sse["written"] > 0 and run["writer"]["events"] == sse["written"]
    assert set(run["aim"]) == {"list_get_p99_under_200ms", "no_event_later_than_1s"}
    assert {"warm_up", "seconds", "alone", "writer", "cpu_seconds", "server_log_errors"} <= run.keys()
    assert "| list_jobs |" in capsys.readouterr().out
