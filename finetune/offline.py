"""Offline mode for every Hugging Face library the engine uses.

The training environment has no internet (P7). These variables make ``huggingface_hub``,
``transformers`` and ``datasets`` fail fast instead of trying the network, and keep telemetry off.
"""

from __future__ import annotations

import os
from typing import Final, TypedDict

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
}


def enforce_offline() -> None:
    """Set the offline variables (before the libraries are imported, where possible)."""
    for key, value in OFFLINE_ENV.items():
        os.environ[key] = value


#: Keyword arguments for every ``from_pretrained`` call: local files only, safetensors only,
#: never remote code.
class LoadKwargs(TypedDict):
    local_files_only: bool
    trust_remote_code: bool


LOAD_KWARGS: Final[LoadKwargs] = {"local_files_only": True, "trust_remote_code": False}
