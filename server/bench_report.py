"""Shared pieces of the server benchmarks: timing statistics, memory readings, report files and plots."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from models import report
from models.atomic import write_atomic

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

    head = report.header()
    head["versions"]["faiss"] = faiss.__version__
    return head


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
