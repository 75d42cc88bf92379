"""`python -m app.openapi [PATH]`: the app's OpenAPI document as YAML (stdout, or PATH written atomically).

`make openapi` writes openapi.yaml at the repository root; tests/app/test_openapi.py fails when it drifts.
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml
from fastapi import FastAPI

from core.settings import Settings
from core.store import atomic_writer

_NULL = {"type": "null"}


def _without_null_parameters(document: dict[str, Any]) -> dict[str, Any]:
    """Optional parameters as plain schemas: FastAPI writes `X | None` as `anyOf: [X, {type: null}]`, but a
    query or header parameter has no null (it is absent), and a client reading the anyOf sends "null"."""
    for item in document.get("paths", {}).values():
        for operation in item.values():
            for param in operation.get("parameters", []) if isinstance(operation, dict) else []:
                schema = param.get("schema", {})
                options = schema.get("anyOf", [])
                rest = [o for o in options if o != _NULL]
                if _NULL in options and len(rest) == 1:
                    param["schema"] = {**{k: v for k, v in schema.items() if k != "anyOf"}, **rest[0]}
    return document


def _body_errors(document: dict[str, Any]) -> dict[str, Any]:
    """Every operation that reads a body may answer 400 (FastAPI's: a body that cannot be parsed at all), 408
    and 413 (the guard's); a create call 429 (a quota)."""
    error = {
        "description": "The body could not be parsed.",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
    }
    too_large = {**error, "description": "The body is larger than this deployment takes (app.guard)."}
    too_slow = {**error, "description": "The body stopped arriving (app.guard's idle timeout); the connection is closed."}
    for item in document.get("paths", {}).values():
        for operation in item.values():
            if isinstance(operation, dict) and "requestBody" in operation:
                responses = operation.setdefault("responses", {})
                responses.setdefault("400", error)
                responses.setdefault("408", too_slow)
                responses.setdefault("413", too_large)
                if operation.get("operationId", "").startswith("create_"):
                    responses.setdefault("429", {**error, "description": "A quota of this key is used up (running jobs, storage)."})
    return document


def _links(document: dict[str, Any]) -> dict[str, Any]:
    """OpenAPI links from each create call (`POST /v1/x`, 201) to the calls on what it made (`/v1/x/{id}...`
    with only that id in the path), the id taken from the response body: clients and stateful fuzzers
    (schemathesis) follow them from a new resource to its reads, events, cancel and delete."""
    paths = document.get("paths", {})
    for collection, item in paths.items():
        created = (item.get("post") or {}).get("responses", {}).get("201")
        if created is None or not re.fullmatch(r"/v1/[a-z]+", collection):
            continue
        links: dict[str, Any] = {}
        for path, target in paths.items():
            match = re.fullmatch(re.escape(collection) + r"/\{(\w+)\}(/[a-z_]+)*", path)
            if not match:
                continue
            for method, operation in target.items():
                if method in ("get", "post", "delete") and isinstance(operation, dict) and "operationId" in operation:
                    links[operation["operationId"]] = {
                        "operationId": operation["operationId"],
                        "parameters": {match.group(1): "$response.body#/id"},
                    }
        if links:
            created["links"] = links
    return document


def install(app: FastAPI) -> None:
    """Serve the app's OpenAPI document with optional parameters as plain schemas, the 400 of body parsing
    documented and links from create calls to their resource's calls (built once, cached)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _links(_body_errors(_without_null_parameters(build())))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


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
