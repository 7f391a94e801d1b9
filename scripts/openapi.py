"""Write the job service's OpenAPI document to finetune/service/openapi.json.

The document is committed so that UI developers can generate clients without running the service;
tests/service/test_openapi.py fails when it no longer matches the app. Run after changing a route:

    .venv/bin/python scripts/openapi.py          # write it
    .venv/bin/python scripts/openapi.py --check  # exit 1 if it is out of date
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TARGET = ROOT / "finetune" / "service" / "openapi.json"


def document() -> dict[str, Any]:
    """The app's OpenAPI document, from an app built without a cluster on a throwaway SQLite database."""
    from finetune.service.app import create_app
    from finetune.service.config import ServiceSettings
    from finetune.settings import Settings

    with tempfile.TemporaryDirectory(prefix="finetune-openapi-") as tmp:
        data = Path(tmp)
        settings = ServiceSettings(mode="embedded", dispatcher=False, database_url=f"sqlite:///{data / 'service.db'}")
        app = create_app(settings, Settings(data_dir=data))
        try:
            return app.openapi()
        finally:
            app.state.service.db.kw["bind"].dispose()


def render(doc: dict[str, Any]) -> str:
    """The document as committed: sorted keys, two-space indent, a trailing newline."""
    return json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--check", action="store_true", help="do not write; exit 1 if the file is out of date")
    parser.add_argument("--output", type=Path, default=TARGET, help=f"where to write (default: {TARGET})")
    args = parser.parse_args(argv)
    text = render(document())
    current = args.output.read_text(encoding="utf-8") if args.output.exists() else None
    if args.check:
        if current != text:
            print(f"{args.output} is out of date: run .venv/bin/python scripts/openapi.py", file=sys.stderr)
            return 1
        return 0
    if current != text:
        args.output.write_text(text, encoding="utf-8")
        print(f"wrote {args.output}")
    else:
        print(f"{args.output} is up to date")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # run from a checkout without installing it
    raise SystemExit(main())
