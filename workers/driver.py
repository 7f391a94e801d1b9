"""The Ray job driver: runs one prepared job on Ray Train and prints its summary.

The job service submits ``python -m workers.driver SPEC_FILE`` as a Ray job whose id is the job's
id; the spec (a :class:`finetune.train.spec.JobSpec` as JSON) names the job's store, which holds
the prepared data, and receives its events, checkpoints and final model. ``--local`` runs a
one-worker job in this process instead (a single GPU without Ray). Exit codes: 0 finished, 75
stopped after a checkpoint (resumable), 2 the tenant's to fix, 1 anything else.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from finetune.errors import fault_of
from finetune.train.launch import launch
from finetune.train.ray_launch import run_on_ray
from finetune.train.spec import JobSpec
from workers.train import train_loop_per_worker

EXIT_OK, EXIT_FAIL, EXIT_TENANT, EXIT_PREEMPTED = 0, 1, 2, 75


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    local = "--local" in args
    args = [a for a in args if a != "--local"]
    if len(args) != 1:
        print("usage: python -m workers.driver SPEC_FILE [--local]", file=sys.stderr)
        return EXIT_FAIL
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    spec = JobSpec.model_validate_json(Path(args[0]).read_text(encoding="utf-8"))
    try:
        if local:
            summary = launch(spec, "local", spec.open_settings())
        else:
            summary = run_on_ray(spec, spec.open_settings(), loop_per_worker=train_loop_per_worker)
    except Exception as exc:
        print(json.dumps({"error": {"type": type(exc).__name__, "message": str(exc), "fault": fault_of(exc)}}))
        return EXIT_TENANT if fault_of(exc) == "tenant" else EXIT_FAIL
    print(summary.model_dump_json())
    return EXIT_PREEMPTED if summary.preempted else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
