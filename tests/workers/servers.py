"""OpenAI-compatible servers for the openai backend's tests: `transformers serve` as a real process, and a
small fault-injecting proxy (500s, 429s, stalls, refused fields) that stands in front of it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import uvicorn
from starlette.responses import JSONResponse, Response


def free_loopback_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextlib.contextmanager
def serve(app) -> Iterator[str]:
    """Run the ASGI `app` with uvicorn on a free loopback port in a thread; yields its `/v1` base URL."""
    sock = free_loopback_socket()
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=1)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=5)
        sock.close()


class FaultProxy:
    """ASGI proxy to an OpenAI-compatible server: records the chat requests, and can fail the first
    `fail_first` of them with `status`, delay each by `delay_s`, or refuse a request holding `refuse_field`
    the way an OpenAI-style server refuses an unknown argument. Everything else goes through unchanged."""

    def __init__(self, upstream: str, *, fail_first: int = 0, status: int = 500, delay_s: float = 0.0,
                 refuse_field: str | None = None) -> None:
        self.upstream = upstream.rstrip("/").removesuffix("/v1")
        self.fail_first, self.status, self.delay_s, self.refuse_field = fail_first, status, delay_s, refuse_field
        self.calls = 0
        self.bodies: list[dict] = []
        self.in_flight = 0
        self.max_in_flight = 0

    async def __call__(self, scope, receive, send) -> None:
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        raw = b"".join(chunks)
        if scope["path"].endswith("/chat/completions"):
            self.calls += 1
            call = self.calls
            body = json.loads(raw)
            self.bodies.append(body)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                if call <= self.fail_first:
                    error = {"error": {"message": f"failure {call}", "type": "server_error", "code": None}}
                    await JSONResponse(error, status_code=self.status)(scope, receive, send)
                    return
                if self.refuse_field and self.refuse_field in body:
                    error = {"error": {"message": f"Unrecognized request argument supplied: {self.refuse_field}",
                                       "type": "invalid_request_error", "code": None}}
                    await JSONResponse(error, status_code=400)(scope, receive, send)
                    return
            finally:
                self.in_flight -= 1
        headers = {k.decode(): v.decode() for k, v in scope["headers"] if k.lower() in (b"content-type", b"authorization")}
        query = scope.get("query_string", b"").decode()
        async with httpx.AsyncClient(timeout=120) as client:
            answer = await client.request(
                scope["method"], f"{self.upstream}{scope['path']}" + (f"?{query}" if query else ""), content=raw,
                headers=headers,
            )
        await Response(answer.content, status_code=answer.status_code,
                       media_type=answer.headers.get("content-type"))(scope, receive, send)


def transformers_cli() -> list[str]:
    """The `transformers` console script of this environment."""
    exe = Path(sys.executable).with_name("transformers")
    found = str(exe) if exe.is_file() else shutil.which("transformers")
    if found is None:
        raise RuntimeError("the `transformers` command is not installed (pip install 'transformers[serving]')")
    return [found]


@contextlib.contextmanager
def transformers_serve(model_dir: Path, log: Path, timeout: float = 120) -> Iterator[str]:
    """`transformers serve MODEL_DIR` on CPU, offline, on a free port; yields its `/v1` base URL.

    The served model name is `str(model_dir)` (the server is pinned to it).
    """
    with free_loopback_socket() as sock:
        port = sock.getsockname()[1]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    cmd = [*transformers_cli(), "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
           "--device", "cpu", "--dtype", "float32", "--log-level", "info"]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"transformers serve did not start:\n{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.2)
        yield f"{base}/v1"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
