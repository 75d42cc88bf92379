"""openapi.yaml at the repository root is the app's schema: regenerate it with `make openapi`."""

from __future__ import annotations

from pathlib import Path

import yaml

from app.openapi import openapi_document, to_yaml

ROOT = Path(__file__).resolve().parents[2]


def test_openapi_yaml_is_in_sync_with_the_app() -> None:
    committed = (ROOT / "openapi.yaml").read_text(encoding="utf-8")
    generated = to_yaml(openapi_document())
    assert yaml.safe_load(committed) == yaml.safe_load(generated), "openapi.yaml is stale: run `make openapi`"


def test_every_operation_documents_the_error_envelope() -> None:
    doc = openapi_document()
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if path.startswith("/v1/"):
                assert op["responses"]["401"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
                assert op["responses"]["422"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
                assert op["security"] == [{"HTTPBearer": []}], (method, path)
    assert "HTTPValidationError" not in doc["components"]["schemas"]
