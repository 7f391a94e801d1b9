"""Fixtures shared by the training tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from finetune.loading import ensure_tiny
from finetune.registry import Registry
from finetune.settings import get_settings

TINY_MODEL_ID = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model, built once per test session (the store lives in the session's base folder)."""
    store = tmp_path_factory.getbasetemp() / "tiny-store"
    return ensure_tiny(Registry.load(get_settings().registry), TINY_MODEL_ID, store)
