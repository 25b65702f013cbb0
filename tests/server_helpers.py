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


def tiny_settings(release: Path, folder: Path, **changes: Any) -> Settings:
    """Settings of a test server: the given release, its store under `folder`, cloud-v1 indexing, an API key."""
    return Settings(release=release, data_dir=folder / "data", model="cloud-v1", api_key=API_KEY).replace(**changes)


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


class ServerProcess:
    """`concord serve` in a subprocess: start, wait until /readyz answers, then stop (SIGTERM) or kill (SIGKILL)."""

    def __init__(self, release: Path, data_dir: Path, model: str = "cloud-v1", api_key: str = API_KEY,
                 log: Path | None = None, extra: list[str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [*concord_command(), "serve", "--release", str(release), "--data-dir", str(data_dir),
                     "--port", str(self.port), "--model", model, "--log-level", "warning", "--threads", "1",
                     *(extra or [])]
        self.env = {**os.environ, "CONCORD_API_KEY": api_key, "OMP_NUM_THREADS": "1"}
        self.log = log or data_dir.parent / f"server-{self.port}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> ServerProcess:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(self.args, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}: {self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1.0).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"the server did not become ready in {timeout} s: {self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, as in a power cut of the process."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self) -> None:
        """SIGTERM: uvicorn's graceful shutdown (the lifespan closes the store)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
