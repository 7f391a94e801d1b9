"""The model archive a tenant downloads at the end of a job: build it, verify it.

See :mod:`finetune.archive.layout` for what it holds.
"""

from finetune.archive.build import BuildResult, build_archive
from finetune.archive.publish import fetch_archive, publish_archive
from finetune.archive.source import ArchiveError
from finetune.archive.verify import VerifyReport, verify_archive

__all__ = [
    "ArchiveError",
    "BuildResult",
    "VerifyReport",
    "build_archive",
    "fetch_archive",
    "publish_archive",
    "verify_archive",
]
