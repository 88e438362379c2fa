"""The serving floor: the smallest KServe v2 endpoint on gpuvisor's HTTP stack, running one
ONNX model in-process, so a benchmark can tell what gpuvisor's serving path costs on top.

It uses what gpuvisor's worker uses (the OIP codec in gpuvisor.runtime.tensors, the ONNX
executor with one intra-op and one inter-op thread) and what gpuvisor's node uses (FastAPI on
uvicorn, no access log), and nothing else: no keys, no queue, no worker process, no batching.

Run as ``python -m gpuvisor.bench.floor --model PATH --port N``; it listens on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import uvicorn
from fastapi import FastAPI, Request
from starlette.responses import Response

from gpuvisor.errors import GpuvisorError
from gpuvisor.launch import free_port
from gpuvisor.runtime.executors.base import ExecutorDevice
from gpuvisor.runtime.executors.onnx import OnnxExecutor
from gpuvisor.runtime.tensors import decode_infer_request, encode_error, encode_infer_response

__all__ = ["FloorProcess", "create_floor_app", "main"]

_HOST = "127.0.0.1"


def create_floor_app(model_path: Path, model_name: str) -> FastAPI:
    """Return the floor's app: POST /v2/models/{model_name}/infer and GET /v2/health/ready."""
    # threads=1 gives the session gpuvisor's worker settings on this benchmark's machine:
    # intra_op_num_threads 1, inter_op_num_threads 1, sequential execution.
    executor = OnnxExecutor(model_path, ExecutorDevice(kind="cpu", threads=1))
    inputs, outputs = executor.inputs, executor.outputs
    app = FastAPI(title="gpuvisor serving floor", openapi_url=None, docs_url=None, redoc_url=None)

    @app.get("/v2/health/ready")
    async def ready() -> Response:
        return Response(b'{"ready":true}', media_type="application/json")

    @app.post("/v2/models/{name}/infer")
    async def infer(request: Request, name: str) -> Response:
        if name != model_name:
            return Response(
                encode_error(f"model '{name}' not found"), 404, media_type="application/json"
            )
        raw_length = request.headers.get("inference-header-content-length")
        body = await request.body()
        try:
            decoded = decode_infer_request(
                body, int(raw_length) if raw_length is not None else None, inputs, outputs
            )
            # In the event loop, not a thread pool: for a model this small the hop to a thread
            # costs more than the model, and the floor should be as fast as Python serves.
            results = executor.run(decoded.inputs)  # all outputs, as gpuvisor's worker does
            payload, header_length = encode_infer_response(
                model_name, "1", decoded, results, outputs
            )
        except GpuvisorError as exc:
            return Response(
                encode_error(exc.message), exc.http_status, media_type="application/json"
            )
        except ValueError as exc:
            return Response(encode_error(str(exc)), 400, media_type="application/json")
        if header_length is None:
            return Response(payload, media_type="application/json")
        return Response(
            payload,
            media_type="application/octet-stream",
            headers={"Inference-Header-Content-Length": str(header_length)},
        )

    return app


@dataclass
class FloorProcess:
    """The floor server as a child process on a free 127.0.0.1 port, stopped by its PID."""

    model_path: Path
    model_name: str
    port: int = field(default_factory=free_port)
    log_path: Path | None = None
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{_HOST}:{self.port}"

    @property
    def address(self) -> str:
        return f"{_HOST}:{self.port}"

    def start(self, timeout: float = 60.0) -> FloorProcess:
        """Start the server and wait until it answers; raise RuntimeError if it exits first,
        TimeoutError if it does not answer within ``timeout`` seconds."""
        cmd = [
            sys.executable,
            "-m",
            "gpuvisor.bench.floor",
            "--model",
            str(self.model_path),
            "--name",
            self.model_name,
            "--port",
            str(self.port),
        ]
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        try:
            self.process = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        finally:
            if not isinstance(log, int):
                log.close()
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()  # also on Ctrl-C: never leave the child behind
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = (
                    self.log_path.read_text()[-3000:]
                    if self.log_path and self.log_path.exists()
                    else ""
                )
                raise RuntimeError(
                    f"the floor server exited with code {self.process.returncode}:\n{tail}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/v2/health/ready", timeout=2).status_code == 200:
                    return
            time.sleep(0.1)
        raise TimeoutError(f"the floor server at {self.url} did not answer within {timeout:.0f}s")

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM the server (only it), SIGKILL it if it lingers; return its exit code."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(10)

    def __enter__(self) -> FloorProcess:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="gpuvisor's serving floor: one ONNX model, in-process"
    )
    parser.add_argument("--model", required=True, type=Path, help="the ONNX model file")
    parser.add_argument(
        "--name", default=None, help="the model's name in URLs (default: file stem)"
    )
    parser.add_argument("--port", required=True, type=int, help="port on 127.0.0.1")
    args = parser.parse_args(argv)
    app = create_floor_app(args.model, args.name or args.model.stem)
    # The same server settings as `gpuvisor up` (gpuvisor.serve).
    config = uvicorn.Config(
        app,
        host=_HOST,
        port=args.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=10,
        lifespan="on",
    )
    uvicorn.Server(config).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
