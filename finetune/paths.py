"""Paths inside a tenant's bucket: what is acceptable, and its normal form.

Recipes name files inside the tenant's bucket and the storage layer resolves them; both use
these rules, so a path a recipe accepts is a path storage can open, and nothing can name a
place outside the bucket.
"""

from __future__ import annotations


def bucket_path_problem(value: str) -> str | None:
    """Why ``value`` is not an acceptable relative path inside the tenant bucket, or None."""
    if not value.strip():
        return "must not be empty"
    if "\\" in value:
        return "must use '/' between folders, not '\\'"
    if value.startswith("/") or (len(value) > 1 and value[1] == ":"):
        return f"must be a path inside your bucket, not an absolute path (got '{value}')"
    if "://" in value:
        return f"must be a path inside your bucket, without a scheme (got '{value}')"
    if any(part == ".." for part in value.split("/")):
        return f"must not contain '..' (got '{value}')"
    if any(ord(ch) < 32 for ch in value):
        return "must not contain control characters"
    if not normalise_bucket_path(value):
        return "must name a file or folder inside your bucket"
    return None


def normalise_bucket_path(value: str) -> str:
    """``./data//train.jsonl`` -> ``data/train.jsonl``. Call after :func:`bucket_path_problem`."""
    return "/".join(p for p in value.split("/") if p not in ("", "."))
