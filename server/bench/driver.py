"""A real Concord server for the benchmarks: `concord serve` in a child process on loopback, and its client.

The server runs exactly as users run it (uvicorn, the FastAPI app, the embedded store); the benchmark
talks to it through the edge's API client (`Server.client`, one keep-alive HTTP connection), so what a
client sees is what is timed.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

from edge.client import ApiError, ConcordClient

SERVE = "from models.cli import main; main()"


class ServerError(RuntimeError):
    """The benchmark's server did not start (a refused request raises the client's `ApiError`)."""


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """`concord serve --release R --data-dir D` on a free loopback port, started and stopped by the benchmark."""

    def __init__(self, release: Path, data_dir: Path, log: Path, model: str | None = None,
                 threads: int | None = None, start_timeout: float = 600.0, wrapper: list[str] | None = None,
                 gallery: str | None = None, index: str | None = None, workers: int = 1) -> None:
        self.release, self.data_dir, self.log = Path(release), Path(data_dir), Path(log)
        self.model, self.threads, self.start_timeout = model, threads, start_timeout
        self.wrapper = list(wrapper or [])
        """A command the server runs under, e.g. ['taskset', '-c', '0'] to pin it to one core."""
        self.gallery, self.index, self.workers = gallery, index, workers
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None
        self.client = ConcordClient(self.url, timeout=600.0)
        """The API client the benchmark talks through (it connects on its first request)."""
        self.start_s = 0.0

    def __enter__(self) -> Server:
        args = [*self.wrapper, sys.executable, "-c", SERVE, "serve", "--release", str(self.release), "--data-dir",
                str(self.data_dir), "--port", str(self.port), "--log-level", "warning"]
        if self.model:
            args += ["--model", self.model]
        if self.threads:
            args += ["--threads", str(self.threads)]
        if self.gallery:
            args += ["--gallery", self.gallery]
        if self.index:
            args += ["--index", self.index]
        if self.workers > 1:
            args += ["--workers", str(self.workers)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONCORD_")}
        self.log.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
        self._wait_ready()
        self.start_s = time.perf_counter() - start
        return self

    def _wait_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"the server exited with code {self.process.returncode} while starting; "
                                  f"see {self.log}: {self._tail()}")
            try:
                self.client.ready()
                return
            except ApiError:
                pass
            time.sleep(0.1)
        self.__exit__(None, None, None)
        raise ServerError(f"the server was not ready within {self.start_timeout:.0f} s; see {self.log}")

    def _tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-800:]
        except OSError:
            return ""

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        self.client.close()
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    @property
    def pid(self) -> int:
        """The server process's id."""
        assert self.process is not None
        return self.process.pid
