"""Shared pieces of the server benchmarks: timing statistics, memory readings, report files and plots."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_OUT = Path("reports/bench")


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


def header() -> dict[str, Any]:
    """Machine (CPU model, cores, load), versions (python, numpy, faiss, onnxruntime, ...) and the command."""
    import faiss

    from models import report

    head = report.header()
    head["versions"]["faiss"] = faiss.__version__
    return head


def context_markdown(data: dict[str, Any]) -> str:
    """The machine, versions and reproducing command of a report as markdown lines."""
    from models import report

    return report.context_markdown(data)


def table(headers: list[str], rows: list[list[str]]) -> str:
    """A markdown table."""
    from models import report

    return report.table(headers, rows)


def write_json(folder: Path, stem: str, data: dict[str, Any]) -> Path:
    """Write `<stem>.json` atomically (temporary file, then rename)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stem}.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_plain) + "\n")
    tmp.replace(path)
    return path


def write_text(path: Path, text: str) -> Path:
    """Write a text file atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
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
        tmp = path.with_name(path.stem + ".tmp.png")
        fig.savefig(tmp, dpi=90)
        tmp.replace(path)
    finally:
        plt.close(fig)
    return path


def fmt(value: float | None, digits: int = 2) -> str:
    """A figure for a table; '-' for a missing one."""
    return "-" if value is None else f"{value:.{digits}f}"
