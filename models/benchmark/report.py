"""Benchmark reports of every part: the machine, the versions, the command, timing statistics, memory readings,
plots, written as JSON and markdown."""

from __future__ import annotations

import io
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

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
    packages = {"concord": "concord", "onnxruntime": "onnxruntime", "onnx": "onnx", "numpy": "numpy",
                "pillow": "pillow", "faiss": "faiss-cpu"}
    for name, package in packages.items():
        try:
            found[name] = metadata.version(package)
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


def latency_ms(samples_ns: Sequence[int]) -> dict[str, float]:
    """p50, p90, p99, mean, min and max of per-call times, in milliseconds, and the count."""
    ms = np.asarray(samples_ns, dtype=np.float64) / 1e6
    if ms.size == 0:
        raise ValueError("no timings to summarise")
    return {"p50": float(np.median(ms)), "p90": float(np.percentile(ms, 90)),
            "p99": float(np.percentile(ms, 99)), "mean": float(ms.mean()), "min": float(ms.min()),
            "max": float(ms.max()), "runs": int(ms.size)}


def interleave(calls: dict[str, Callable[[int], Any]], rounds: int) -> dict[str, list[int]]:
    """Time `calls[name](round)` once per round for every name, rotating which goes first each round.

    A busy moment of a shared machine then hits every contender alike: comparisons come from one run.
    """
    names = list(calls)
    times: dict[str, list[int]] = {name: [] for name in names}
    for round_ in range(rounds):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter_ns()
            calls[name](round_)
            times[name].append(time.perf_counter_ns() - start)
    return times


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc), 0 where it cannot be read."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def write_json(folder: Path, stem: str, data: dict[str, Any]) -> Path:
    """Write `<stem>.json` atomically (temporary file, fsync, then rename)."""
    return write_text(folder / f"{stem}.json", json.dumps(data, indent=2, default=_plain) + "\n")


def write_text(path: Path, text: str) -> Path:
    """Write a text file atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, text.encode())
    return path


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to a report")


def figure(path: Path, draw: Callable[[Any], None], size: tuple[float, float] = (6.0, 3.6)) -> Path:
    """Draw one small PNG (Agg backend, 90 dpi) with `draw(axes)` and save it atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(figsize=size, dpi=90)
    try:
        draw(axes)
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=90)
        write_atomic(path, buffer.getbuffer())
    finally:
        plt.close(fig)
    return path
