"""A small Python client for the HTTP API (used by `miadpo demo`; handy in notebooks and scripts).

    client = Client("http://127.0.0.1:8000", api_key="...")
    ds = client.wait_dataset(client.upload_dataset("data.zip")["id"])
    ps = client.wait_pairset(client.create_pairset(dataset_id=ds["id"], model="tiny-llava")["id"])
    client.download(f"/v1/pairsets/{ps['id']}/download", "pairs.tar.gz")
"""

from __future__ import annotations

import io
import time
import uuid
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

TERMINAL = {"ready", "succeeded", "failed", "cancelled"}


class ApiError(RuntimeError):
    """An error envelope from the server."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        err = body.get("error", {}) if isinstance(body, dict) else {}
        self.status = status
        self.code = err.get("code")
        self.param = err.get("param")
        super().__init__(f"{status} {err.get('type', 'error')}: {err.get('message', body)}")


def zip_folder(folder: Path) -> bytes:
    """A folder as zip bytes, paths relative to it (how a dataset folder is uploaded)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:  # images are compressed already
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, path.relative_to(folder).as_posix())
    return buf.getvalue()


class Client:
    """Thin wrapper over the v1 API: JSON in and out, errors raised as ApiError."""

    def __init__(self, base_url: str, api_key: str, timeout: float = 60.0) -> None:
        self.http = httpx.Client(base_url=base_url.rstrip("/"), headers={"Authorization": f"Bearer {api_key}"}, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _json(self, response: httpx.Response) -> Any:
        if response.status_code >= 400:
            try:
                body = response.json()
            except ValueError:
                body = {"error": {"message": response.text}}
            raise ApiError(response.status_code, body)
        return response.json()

    def get(self, path: str, **params: Any) -> Any:
        return self._json(self.http.get(path, params=params or None))

    def post(self, path: str, body: dict[str, Any] | None = None, idempotency_key: str | None = None) -> Any:
        headers = {"Idempotency-Key": idempotency_key or uuid.uuid4().hex}
        return self._json(self.http.post(path, json=body or {}, headers=headers))

    # -- datasets
    def upload_dataset(self, path: str | Path, name: str | None = None) -> dict[str, Any]:
        """Upload an archive or a dataset file; a folder is zipped on the fly."""
        path = Path(path)
        if path.is_dir():
            filename, content = f"{path.name}.zip", zip_folder(path)
        else:
            filename, content = path.name, path.read_bytes()
        data = {"name": name} if name else {}
        response = self.http.post("/v1/datasets", files={"file": (filename, content)}, data=data, headers={"Idempotency-Key": uuid.uuid4().hex})
        return self._json(response)

    def wait_dataset(self, dataset_id: str, poll_s: float = 0.5, timeout_s: float = 600) -> dict[str, Any]:
        return self._wait(f"/v1/datasets/{dataset_id}", poll_s, timeout_s)

    # -- pair sets and trainings
    def create_pairset(self, **body: Any) -> dict[str, Any]:
        return self.post("/v1/pairsets", body)

    def wait_pairset(self, pairset_id: str, on_update: Callable[[dict], None] | None = None, poll_s: float = 0.5, timeout_s: float = 3600) -> dict[str, Any]:
        return self._wait(f"/v1/pairsets/{pairset_id}", poll_s, timeout_s, on_update)

    def wait_training(self, training_id: str, on_update: Callable[[dict], None] | None = None, poll_s: float = 0.5, timeout_s: float = 3600) -> dict[str, Any]:
        return self._wait(f"/v1/trainings/{training_id}", poll_s, timeout_s, on_update)

    def _wait(self, path: str, poll_s: float, timeout_s: float, on_update: Callable[[dict], None] | None = None) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            record = self.get(path)
            if on_update is not None:
                on_update(record)
            if record["status"] in TERMINAL:
                return record
            if time.monotonic() > deadline:
                raise TimeoutError(f"{path} still {record['status']} after {timeout_s:.0f}s")
            time.sleep(poll_s)

    def download(self, path: str, dest: str | Path) -> Path:
        """Stream a download to `dest` (written under a temporary name, then renamed)."""
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".part")
        with self.http.stream("GET", path) as response:
            if response.status_code >= 400:
                response.read()
                self._json(response)
            with open(tmp, "wb") as fh:
                for chunk in response.iter_bytes(1 << 20):
                    fh.write(chunk)
        tmp.replace(dest)
        return dest
