"""The devices an estimate can be made for: bf16 peak, memory, and whether there is a GPU at all."""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass
from typing import Any

from finetune.flops import PEAK_BF16

#: ``--gpu`` choices and the device kind each one means (kinds as in the benchmark results).
DEVICE_CHOICES = {"h100": "h100-sxm", "h100-sxm": "h100-sxm", "h100-pcie": "h100-pcie", "h200": "h200", "cpu": "cpu"}

#: Memory of one GPU, bytes, from the vendors' data sheets (decimal gigabytes). The memory a
#: process can allocate is a little more than these figures (an "80 GB" H100 reports about 79 GiB),
#: so a fit judged against them errs on the safe side.
GPU_MEMORY = {"h100-sxm": 80 * 10**9, "h100-pcie": 80 * 10**9, "h200": 141 * 10**9}

_NAMES = {"h100-sxm": "NVIDIA H100 SXM 80GB", "h100-pcie": "NVIDIA H100 PCIe 80GB", "h200": "NVIDIA H200 141GB"}


@dataclass(frozen=True)
class Device:
    """What an estimate needs to know about the device a job runs on.

    Attributes:
        kind: ``h100-sxm``, ``h100-pcie``, ``h200`` or ``cpu`` (the ``device.kind`` of benchmark results).
        name: Human-readable name.
        peak_flops: Dense bf16 peak FLOP/s; None on a CPU (no meaningful peak).
        memory_bytes: Memory of one GPU, or of the whole machine for ``cpu``.
    """

    kind: str
    name: str
    peak_flops: float | None
    memory_bytes: int

    @property
    def is_gpu(self) -> bool:
        return self.kind != "cpu"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _host_memory() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):  # not a POSIX system
        return 0


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"


def device_for(choice: str) -> Device:
    """The device of a ``--gpu`` choice (see :data:`DEVICE_CHOICES`); ``cpu`` describes this machine.

    Raises:
        ValueError: An unknown choice.
    """
    kind = DEVICE_CHOICES.get(choice)
    if kind is None:
        raise ValueError(f"unknown device {choice!r}; choose one of {', '.join(DEVICE_CHOICES)}")
    if kind == "cpu":
        return Device("cpu", f"{_cpu_name()} ({os.cpu_count() or 1} cores)", None, _host_memory())
    return Device(kind, _NAMES[kind], PEAK_BF16[kind], GPU_MEMORY[kind])
