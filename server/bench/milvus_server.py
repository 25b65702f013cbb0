"""A real Milvus standalone server for tests and benchmarks, from the PyPI package `milvus` (2.3.5 on Linux).

The server runs in its own process group (ending the launcher alone leaves Milvus running, so `stop` and `kill`
end the whole group) with its data under one folder; clients talk to 127.0.0.1 only (it binds every interface).
A restart after SIGKILL can take about a minute and occasionally needs a second start: `start` retries once and
says so.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

log = logging.getLogger("concord.bench")

TICK_MS = 2
"""The proxy's time tick (Milvus default 200 ms). A Strong-consistency read waits for the tick after its request
arrives, so the tick bounds the latency every search and count adds (about 27 ms a read at 20 ms here). On a
quiet 2-core machine, 20,000 vectors, one search through the gallery: p50 10.7 ms / p99 22.4 ms at 5 ms,
7.3 / 16.2 ms at 2 ms (an Eventually read: 3.1 ms)."""


class MilvusServer:
    """`milvus run standalone` under `folder`; `address` is `127.0.0.1:<port>` once started."""

    def __init__(self, folder: Path, tick_ms: int = TICK_MS) -> None:
        """Prepare the configuration (free ports on 127.0.0.1, the proxy's time tick) and unpack the binaries."""
        try:
            from milvus import MilvusServerConfig, _initialize_data_files
        except ImportError:
            raise RuntimeError("the Milvus standalone server needs the PyPI package 'milvus' "
                               "(pip install 'concord[milvus]'; Linux wheels up to 2.3.5)") from None
        self.folder = Path(folder).resolve()
        self.folder.mkdir(parents=True, exist_ok=True)
        config = MilvusServerConfig(data_dir=str(self.folder))
        config.resolve_storage()
        config.set("proxy.timeTickInterval", int(tick_ms))
        config.resolve()
        _initialize_data_files(str(self.folder))
        self.port = int(config.get("proxy_port"))
        self.health_port, sock = config.resolve_port(9091)
        sock.close()
        self.address = f"127.0.0.1:{self.port}"
        self.uri = f"http://{self.address}"
        self.process: subprocess.Popen[bytes] | None = None
        self.log = self.folder / "logs" / "milvus-stdout.log"

    def start(self, timeout: float = 120.0) -> MilvusServer:
        """Start and wait until healthy; after a failed or slow start, one more try (reported in the log)."""
        for attempt in (1, 2):
            self._spawn()
            if self._wait_healthy(timeout):
                if attempt > 1:
                    log.warning("Milvus at %s needed a second start", self.address)
                return self
            log.warning("Milvus at %s did not become healthy in %.0f s (attempt %d); restarting it", self.address,
                        timeout, attempt)
            self.kill()
        raise RuntimeError(f"Milvus standalone at {self.address} did not start twice in {timeout:.0f} s; "
                           f"see {self.log}")

    def _spawn(self) -> None:
        binary = self.folder / "bin" / "milvus"
        env = {**os.environ, "DEPLOY_MODE": "STANDALONE", "METRICS_PORT": str(self.health_port),
               "MILVUS_RUN_DIR": str(self.folder / "run"),
               "LD_LIBRARY_PATH": f"{self.folder / 'bin'}:{os.environ.get('LD_LIBRARY_PATH', '')}"}
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen([str(binary), "run", "standalone"], cwd=self.folder, env=env,
                                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def _wait_healthy(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        url = f"http://127.0.0.1:{self.health_port}/healthz"
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(url, timeout=2) as answer:
                    if b"OK" in answer.read():
                        return True
            except OSError:
                pass
            time.sleep(0.2)
        return False

    def _signal_group(self, sig: signal.Signals) -> None:
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, sig)

    def kill(self) -> None:
        """SIGKILL the server's whole process group (a crash)."""
        self._signal_group(signal.SIGKILL)
        if self.process is not None:
            self.process.wait(timeout=30)
            self.process = None

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the group, then SIGKILL what is left after `grace` seconds."""
        if self.process is None:
            return
        self._signal_group(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=grace)
        self.kill()

    def __enter__(self) -> MilvusServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
