"""The ops benchmark's Ray job driver: ``python -m workers.benchmark``.

Reads a :class:`finetune.service.benchmarks.BenchmarkRequest` (JSON, environment variable
``FINETUNE_BENCHMARK``), runs ``benchmarks/throughput.py`` on each GPU asked for (a Ray task per
GPU; a CPU each on a cluster without GPUs), and ends its log with one line: the marker and the
per-GPU results as JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from finetune.service.benchmarks import ENV, RESULT_MARKER, BenchmarkRequest, script


def _one(script_path: str, argv: list[str]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="finetune-bench-") as tmp:
        out = Path(tmp) / "result.json"
        done = subprocess.run([sys.executable, script_path, *argv, "--out", str(out)], check=False,
                              stdout=sys.stderr, stderr=sys.stderr)  # fmt: skip
        if done.returncode != 0 or not out.is_file():
            raise RuntimeError(f"the benchmark exited with {done.returncode}")
        return dict(json.loads(out.read_text(encoding="utf-8")))


def main() -> int:
    import ray

    raw = os.environ.get(ENV)
    if not raw:
        print(f"{ENV} is not set: this driver is started by the job service", file=sys.stderr)
        return 1
    request = BenchmarkRequest.model_validate_json(raw)
    path = script()
    if path is None:
        print("benchmarks/throughput.py is not installed with the engine", file=sys.stderr)
        return 1
    ray.init(address="auto")  # the cluster this driver runs on
    gpu = ray.cluster_resources().get("GPU", 0) > 0
    task = ray.remote(num_gpus=1 if gpu else 0, num_cpus=0 if gpu else 1)(_one)
    results = ray.get([task.remote(str(path), request.argv(gpu=gpu)) for _ in range(request.gpus)])
    print(RESULT_MARKER + json.dumps(results, allow_nan=False, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
