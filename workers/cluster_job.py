"""The Ray job driver the job service submits: ``python -m workers.cluster_job``.

Its input is a :class:`finetune.train.cluster_job.ClusterJob` as JSON in the environment variable
``FINETUNE_CLUSTER_JOB``. Exit codes: 0 finished (archive published), 75 stopped after a
checkpoint (resumable), 2 the tenant's to fix, 1 anything else.
"""

from __future__ import annotations

import logging
import os
import sys

from finetune.train.cluster_job import ENV, EXIT_FAIL, ClusterJob, run_cluster_job
from workers.train import train_loop_per_worker


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    raw = os.environ.get(ENV)
    if not raw:
        print(f"{ENV} is not set: this driver is started by the job service", file=sys.stderr)
        return EXIT_FAIL
    job = ClusterJob.model_validate_json(raw)
    return run_cluster_job(job, loop_per_worker=train_loop_per_worker)


if __name__ == "__main__":
    sys.exit(main())
