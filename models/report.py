"""Benchmark reports of every part: the machine, the versions, the command, written as JSON and markdown."""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from models.atomic import write_atomic

DEFAULT_REPORT_DIR = Path("reports/edge")


def machine() -> dict[str, Any]:
    """CPU model, cores (all and usable), memory and load: the context any timing needs."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info: dict[str, Any] = {"cpu": cpu, "cores": os.cpu_count(), "usable_cores": usable,
                            "platform": platform.platform(), "hostname": platform.node()}
    if hasattr(os, "getloadavg"):
        info["load_average_1_5_15"] = [round(x, 2) for x in os.getloadavg()]
    return info


def versions() -> dict[str, str]:
    """Versions of Python, the packages that run the models, and the project's git commit."""
    found = {"python": sys.version.split()[0]}
    for package in ("concord", "onnxruntime", "onnx", "numpy", "pillow"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                timeout=5, cwd=Path(__file__).resolve().parent, check=False)
        if commit.returncode == 0:
            found["git_commit"] = commit.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return found


def command_line() -> str:
    """The command that produced a report, as typed (the `concord` entry point's arguments)."""
    name = Path(sys.argv[0]).name if sys.argv else "concord"
    return shlex.join([name, *sys.argv[1:]])


def shown_path(path: str | Path) -> str:
    """A path as a report records it: relative to the working folder when inside it (so a report reads the same
    on every checkout), else as given."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def header() -> dict[str, Any]:
    """Fields every report starts with."""
    return {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": command_line(),
            "machine": machine(), "versions": versions()}


def write(folder: str | Path, stem: str, data: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    """Write `<stem>.json` and `<stem>.md` atomically; return their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / f"{stem}.json", folder / f"{stem}.md"
    for path, text in zip(paths, (json.dumps(data, indent=2) + "\n", markdown), strict=True):
        write_atomic(path, text.encode())
    return paths


def table(headers: list[str], rows: list[list[str]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def context_markdown(data: dict[str, Any]) -> str:
    """The machine, versions and command of a report as markdown lines."""
    m, v = data["machine"], data["versions"]
    return (f"- command: `{data['command']}`\n- created: {data['created']}\n"
            f"- machine: {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable), {m['platform']}, "
            f"load {m.get('load_average_1_5_15')}\n"
            f"- versions: {', '.join(f'{k} {val}' for k, val in v.items())}\n")


def fmt(value: float | None, digits: int = 2) -> str:
    """A figure for a table with `digits` decimals; '-' for a missing one (e.g. an empty query subset)."""
    return "-" if value is None else f"{value:.{digits}f}"
