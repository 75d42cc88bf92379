"""`python -m app.openapi [PATH]`: the app's OpenAPI document as YAML (stdout, or PATH written atomically).

`make openapi` writes openapi.yaml at the repository root; tests/app/test_openapi.py fails when it drifts.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from core.settings import Settings
from core.store import atomic_writer


def openapi_document() -> dict[str, Any]:
    """The schema does not depend on settings; a throwaway data dir keeps `./data` from being created."""
    from app.main import create_app

    with tempfile.TemporaryDirectory() as tmp:
        return create_app(Settings(data_dir=Path(tmp))).openapi()


def to_yaml(document: dict[str, Any]) -> str:
    return yaml.safe_dump(document, sort_keys=False, allow_unicode=True, width=120)


def main(argv: list[str]) -> int:
    text = to_yaml(openapi_document())
    if not argv:
        sys.stdout.write(text)
        return 0
    dest = Path(argv[0])
    with atomic_writer(dest, "w") as fh:
        fh.write(text)
    dest.chmod(0o644)  # a file of the repository, not a private temp file
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
