"""What a model archive holds, by name, and the rules its member names follow.

One tar file (optionally zstd-compressed), every member under one top folder, the manifest first::

    <name>/manifest.json                     every other file's size and sha256, the format and
                                             engine versions, the base model's identity and origin;
                                             signed with the platform key
    <name>/README.md                         the model card
    <name>/recipe.json                       the resolved recipe
    <name>/metrics.jsonl                     the training metrics, as logged
    <name>/loss_curve.png                    training and evaluation loss by step
    <name>/data_stats.json                   dataset statistics (counts only, never content)
    <name>/model/                            the complete model (sharded safetensors)
    <name>/adapter/                          the LoRA adapter (peft layout)
    <name>/verification/reference.safetensors   the engine's logits on a fixed prompt
"""

from __future__ import annotations

import re

FORMAT = "finetune-model-archive"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CARD = "README.md"
MERGED_DIR = "model"
ADAPTER_DIR = "adapter"
REFERENCE_FILE = "verification/reference.safetensors"

#: The verification prompt (English and Traditional Chinese, rendered with the model's chat template).
PROMPT = [{"role": "user", "content": "Hello! 請用一句話介紹你自己。"}]

#: Largest difference allowed between the archive's logits (computed in fp32 from the weights as
#: stored) and the engine's reference (fp32, adapter unmerged), as a fraction of the largest
#: reference logit (at least 1). fp32 weights differ from the engine's only by the order of
#: operations (a LoRA merged into the base: ~1e-6). Half-precision weights carry their rounding:
#: a LoRA merged into a bf16 base and cast back to bf16 measured 1.4e-2 (16 layers) and 1.9e-2
#: (32 layers, width 2048) with random weights; fp16 rounds 8 times finer.
#: The verifier's own: a manifest's stated tolerance is informational and never read back.
TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2, "float16": 2e-2}
#: The adapter is applied unmerged in fp32 on the base model, as the engine ran it.
ADAPTER_TOLERANCE = 1e-4

#: Longest member name, and longest part of one (file systems refuse names over 255 bytes).
MAX_NAME, MAX_PART = 1024, 255

_SAFE_PART = re.compile(r"^[A-Za-z0-9._@+=-][A-Za-z0-9 ._@+=-]*$")


def member_problem(name: str) -> str | None:
    """Why a tar member name is unsafe or not plain, or None when it is fine.

    Plain means: relative, '/'-separated, no empty, '.' or '..' parts, no backslashes, control
    characters or shell-special characters.
    """
    if not name:
        return "empty member name"
    if len(name) > MAX_NAME or any(len(part) > MAX_PART for part in name.split("/")):
        return f"member name longer than {MAX_NAME} characters, or with a part longer than {MAX_PART}"
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        return "absolute member name"
    if "\\" in name:
        return "backslash in member name"
    parts = name.rstrip("/").split("/")
    if any(part in ("", ".", "..") for part in parts):
        return "member name with an empty, '.' or '..' part"
    if not all(_SAFE_PART.match(part) for part in parts):
        return "member name with characters other than letters, digits, space and ._@+=-"
    return None


def archive_name(stem: str) -> str:
    """A plain top-folder name from a file stem or job name."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip(".-") or "model"
    return name[:100]


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30,
          "TIB": 2**40}  # fmt: skip


def parse_size(text: str) -> int:
    """Bytes in a size such as ``5GB``, ``200MB``, ``512MiB`` or ``1000000``.

    Raises:
        ValueError: ``text`` is not a positive size.
    """
    match = _SIZE.match(text)
    size = int(float(match.group(1)) * _UNITS[(match.group(2) or "B").upper()]) if match else 0
    if size <= 0:
        raise ValueError(f"{text!r} is not a size: write it as 5GB, 200MB, 512MiB or a number of bytes")
    return size
