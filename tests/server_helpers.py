"""Helpers of the server tests: small distinct photos, hostile files, a release with failing models, and a
real server process (`concord serve` in a subprocess on a free port)."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from models.manifest import Manifest, ModelEntry, Space
from server.settings import Settings

API_KEY = "test-key-123"
WRITE = {"X-API-Key": API_KEY}


GALLERIES = ["embedded", "milvus-lite"]
"""The gallery backends every API test runs on (the Milvus standalone server has its own tests)."""


def gallery_setting(kind: str, folder: Path) -> str:
    """The `gallery` setting of a test server of this backend, its Milvus Lite file under `folder`."""
    return f"milvus-lite:{folder / 'milvus' / 'gallery.db'}" if kind == "milvus-lite" else kind


def tiny_settings(release: Path, folder: Path, gallery: str = "embedded", **changes: Any) -> Settings:
    """Settings of a test server: the given release, its store under `folder` (of backend `gallery`), cloud-v1
    indexing, an API key."""
    return Settings(release=release, data_dir=folder / "data", model="cloud-v1", api_key=API_KEY,
                    gallery=gallery_setting(gallery, folder)).replace(**changes)


@contextmanager
def in_process(settings: Settings) -> Iterator[Any]:
    """A started app (lifespan run) behind fastapi's TestClient."""
    from fastapi.testclient import TestClient

    from server.app import create_app

    with TestClient(create_app(settings)) as client:
        yield client


def add_photos(client: Any, photos: dict[str, bytes], metadata: Any = None) -> list[dict[str, Any]]:
    """POST photos (with optional metadata: one object or a list); return the per-photo answers, asserting 200."""
    data = {"metadata": json.dumps(metadata)} if metadata is not None else {}
    response = client.post("/v1/photos", files=[("files", (name, b, "image/jpeg")) for name, b in photos.items()],
                           data=data, headers=WRITE)
    assert response.status_code == 200, response.text
    return list(response.json()["photos"])


def make_photo(seed: int, size: int = 48, fmt: str = "JPEG") -> bytes:
    """A small photo of random 8x8 colour blocks: distinct per seed, and distinct after the models' pooling."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    image = Image.fromarray(blocks).resize((size, size), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def bomb_png(width: int = 30_000, height: int = 30_000) -> bytes:
    """A tiny PNG whose header claims width x height pixels (a decompression bomb: refuse before decoding)."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    ihdr = 8  # signature; then length(4) 'IHDR'(4) width(4) height(4) ...
    struct.pack_into(">II", data, ihdr + 8, width, height)
    body = bytes(data[ihdr + 4:ihdr + 8 + 13])
    struct.pack_into(">I", data, ihdr + 8 + 13, zlib.crc32(body) & 0xFFFFFFFF)
    return bytes(data)


def release_with_misfits(tiny_release: Path, folder: Path) -> Path:
    """A copy of the tiny release plus models a server must refuse to mix with its gallery.

    - `cloud-x`: cloud v3 descending from cloud-v2 whose figures FAIL the gate (worse than cloud-v2 on cloud-v1);
    - `indie-v1`: a cloud model of the same space with no lineage to the others (not comparable);
    - `other-v1`: an edge model of another space.
    """
    shutil.copytree(tiny_release, folder)
    manifest = Manifest.load(folder)
    base = manifest.model("cloud-v2")
    poor = {"recall@1": 0.5, "recall@5": 0.7, "map": 0.3}
    extra = {
        "cloud-x": ModelEntry(id="cloud-x", role="cloud", space=base.space, dim=base.dim, version=3,
                              parents=("cloud-v2",), file=base.file, sha256=base.sha256, preprocess=base.preprocess,
                              arch="tiny", metrics={"benchmark": "tiny",
                                                    "matrix": {"cloud-x": {"cloud-v1": poor, "cloud-v2": poor}}}),
        "indie-v1": ModelEntry(id="indie-v1", role="cloud", space=base.space, dim=base.dim, version=1, parents=(),
                               file=base.file, sha256=base.sha256, preprocess=base.preprocess, arch="tiny"),
        "other-v1": ModelEntry(id="other-v1", role="edge", space="other", dim=base.dim, version=1, parents=(),
                               file=base.file, sha256=base.sha256, preprocess=base.preprocess, arch="tiny"),
    }
    spaces = {**manifest.spaces, "other": Space("other", base.dim)}
    Manifest(spaces=spaces, models={**manifest.models, **extra}, release="tiny-misfits").save(folder)
    return folder


def unit(vector: Any) -> list[float]:
    array = np.asarray(vector, dtype=np.float64)
    return [float(x) for x in array / np.linalg.norm(array)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def concord_command() -> list[str]:
    """How to run `concord`: the console script beside this Python, else the dispatcher module."""
    script = Path(sys.executable).parent / "concord"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from models.cli import main; main(sys.argv[1:])"]


LAUNCHER = r"""
import json, os, signal, sys
import models.cli, server.app, server.cli, server.service, uvicorn  # what every start would import again
signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the servers when they die
for line in sys.stdin:
    pid = os.fork()
    if pid == 0:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.dup2(2, 1)  # the server logs where the launcher does; stdout is the launcher's answer pipe
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        try:
            models.cli.main(json.loads(line))
        finally:
            os._exit(0)
    print(pid, flush=True)
"""


class Launcher:
    """A process that has imported the server once and forks a fresh `concord serve` process per start.

    Each server is a real process of its own (its own port, store, SIGKILL), running the `concord serve` code
    path, without paying the ~2-4 s of imports per start: crash tests restart the server many times.
    """

    def __init__(self, log: Path, env: dict[str, str]) -> None:
        self.log = log
        self._file = open(log, "ab")  # noqa: SIM115 - open for the launcher's whole life
        self.process = subprocess.Popen([sys.executable, "-c", LAUNCHER], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=self._file, env=env, text=True)

    def spawn(self, argv: list[str]) -> int:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps(argv) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the launcher died (exit code {self.process.poll()})")
        return int(line)

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        self.process.wait(timeout=30)
        self._file.close()

    def __enter__(self) -> Launcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ServerProcess:
    """`concord serve` in a process of its own: start, wait until /readyz answers, then stop (SIGTERM) or kill
    (SIGKILL). With a `launcher` the process is forked from it instead of started from scratch."""

    def __init__(self, release: Path, data_dir: Path, model: str = "cloud-v1", api_key: str = API_KEY,
                 log: Path | None = None, launcher: Launcher | None = None, gallery: str = "embedded",
                 workers: int = 1) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.argv = ["serve", "--release", str(release), "--data-dir", str(data_dir), "--port", str(self.port),
                     "--model", model, "--log-level", "warning", "--threads", "1", "--gallery", gallery,
                     "--workers", str(workers)]
        self.env = server_env(api_key)
        self.log = log or data_dir.parent / f"server-{self.port}.log"
        self.launcher = launcher
        self.pid: int | None = None
        self.process: subprocess.Popen[bytes] | None = None

    def alive(self) -> bool:
        if self.process is not None:
            return self.process.poll() is None
        if self.pid is None:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def start(self, timeout: float = 60.0) -> ServerProcess:
        if self.launcher is not None:
            self.process, self.pid = None, self.launcher.spawn(self.argv)
        else:
            with open(self.log, "ab") as log:
                self.process = subprocess.Popen([*concord_command(), *self.argv], env=self.env, stdout=log,
                                                stderr=subprocess.STDOUT)
            self.pid = self.process.pid
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"the server exited while starting: {self._tail()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1.0).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"the server did not become ready in {timeout} s: {self._tail()}")

    def _tail(self) -> str:
        log = self.launcher.log if self.launcher else self.log
        return log.read_text(errors="replace")[-3000:]

    def _signal(self, sig: signal.Signals, timeout: float = 30.0) -> None:
        if not self.alive() or self.pid is None:
            return
        os.kill(self.pid, sig)
        if self.process is not None:
            self.process.wait(timeout=timeout)
            return
        deadline = time.monotonic() + timeout
        while self.alive():
            if time.monotonic() > deadline:
                raise RuntimeError(f"server {self.pid} did not exit after {sig.name}")
            time.sleep(0.005)

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, as when the process is killed by the OOM killer or a power cut."""
        self._signal(signal.SIGKILL)

    def stop(self) -> None:
        """SIGTERM: uvicorn's graceful shutdown (the lifespan closes the store)."""
        try:
            self._signal(signal.SIGTERM)
        except (RuntimeError, subprocess.TimeoutExpired):
            self.kill()

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def server_env(api_key: str = API_KEY) -> dict[str, str]:
    """The environment of a test server: its API key, one thread per numeric library (the machine is shared)."""
    return {**os.environ, "CONCORD_API_KEY": api_key, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
