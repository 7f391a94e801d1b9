"""The estimator (platform rule P13): what a recipe's job will take, before it runs.

From a recipe and its dataset: the tokens it trains, the FLOPs, the expected throughput (measured
where a recorded benchmark run fits, else a stated share of the GPU's peak), the wall time with
its start-up allowance, GPU-hours and points (1 point = 0.5 GPU-hour), and the memory per GPU
with the ZeRO stage the engine would choose. ``finetune estimate`` and the job service call
:func:`estimate_recipe`; every assumption travels with the result.
"""

from finetune.estimate.core import estimate_recipe
from finetune.estimate.devices import DEVICE_CHOICES, Device, device_for
from finetune.estimate.result import Estimate
from finetune.estimate.timing import Allowances

__all__ = ["DEVICE_CHOICES", "Allowances", "Device", "Estimate", "device_for", "estimate_recipe"]
