"""What a job runs on, by name: recorded with a job's metrics and in its archive's model card."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_name() -> str:
    """The processor's model name (``/proc/cpuinfo``), or what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(cuda: bool, index: int = 0) -> str:
    """The name of the accelerator a worker trains on, or of the CPU."""
    if cuda:
        import torch

        return str(torch.cuda.get_device_name(index))
    return cpu_name()


def describe(cuda: bool, workers: int) -> dict[str, object]:
    """``{"device": name, "kind": "gpu" | "cpu", "count": workers, "cpu_cores": n}`` for a job's records."""
    return {
        "device": device_name(cuda),
        "kind": "gpu" if cuda else "cpu",
        "count": workers,
        "cpu_cores": os.cpu_count(),
    }
