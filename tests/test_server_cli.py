"""The first minutes with `concord serve`: one-line errors for a held store and a busy port, help that shows each
option's variable and default, and one default server for every client command."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from models.cli import DEFAULT_SERVER
from server.settings import Settings
from tests.server_helpers import ServerProcess, concord_command, server_env


def concord(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**server_env(), "COLUMNS": "200", "TERM": "dumb"}
    return subprocess.run([*concord_command(), *args], capture_output=True, text=True, env=env, timeout=timeout,
                          check=False)


def test_a_held_store_and_a_busy_port_are_one_line_errors(tiny_release: Path, tmp_path: Path) -> None:
    with ServerProcess(tiny_release, tmp_path / "data") as server:
        held = concord("serve", "--release", str(tiny_release), "--data-dir", str(tmp_path / "data"), "--port",
                       str(server.port + 1 if server.port < 65535 else server.port - 1), "--model", "cloud-v1")
        busy = concord("serve", "--release", str(tiny_release), "--data-dir", str(tmp_path / "other"), "--port",
                       str(server.port), "--model", "cloud-v1")
    assert held.returncode == 1 and "Traceback" not in held.stderr, held.stderr
    assert held.stderr.strip().count("\n") == 0 and "held by another process" in held.stderr, held.stderr
    assert busy.returncode == 1 and "Traceback" not in busy.stderr, busy.stderr
    assert busy.stderr.strip().count("\n") == 0 and "--port" in busy.stderr and "in use" in busy.stderr, busy.stderr


def test_serve_help_shows_every_variable_and_its_default() -> None:
    shown = concord("serve", "--help").stdout
    flat = " ".join(shown.replace("│", " ").split())
    for name in ("release", "data_dir", "host", "port", "api_key", "model", "max_request_bytes", "max_request_pixels",
                 "max_metadata_bytes", "keep_bytes", "threads", "faiss_threads", "index", "gallery", "log_level"):
        assert f"(env CONCORD_{name.upper()}; default " in flat, name
    assert "default 127.0.0.1" in flat and "default 8000" in flat and "default concord-data" in flat


def test_every_client_command_has_the_serve_default_as_its_server() -> None:
    defaults = Settings()
    assert f"http://{defaults.host}:{defaults.port}" == DEFAULT_SERVER
    for command in ("query", "index"):
        flat = " ".join(concord(command, "--help").stdout.replace("│", " ").split())
        assert f"(env CONCORD_SERVER; default {DEFAULT_SERVER})" in flat, (command, flat)
    assert "CONCORD_SERVER" not in os.environ
