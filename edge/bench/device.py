"""Device benchmark: batch-1 latency on one thread of the edge (fp32, int8) and cloud encoders, side by side.

Every model gets the same real photo, preprocessed per its own manifest entry. After a warm-up, rounds
interleave the models (rotating their order) so a busy moment of a shared machine hits all of them
alike; the report gives medians and p90 of the per-run times, the file sizes and the ratios.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.benchmark import report
from models.preprocess import load_image, preprocess

STEM = "device_bench"


@dataclass(frozen=True)
class BenchConfig:
    """Rounds of timing, warm-up runs per model, threads per session, and which models."""

    rounds: int = 300
    warmup: int = 30
    threads: int = 1
    edge: str | None = None
    """Edge model id; default: the newest edge model."""
    cloud: str | None = None
    """Cloud model id; default: the edge model's cloud parent of its version."""

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.warmup < 0 or self.threads < 1:
            raise ValueError(f"need rounds >= 1, warmup >= 0, threads >= 1; got {self}")


@dataclass(frozen=True)
class Contender:
    """One model file timed by the benchmark."""

    name: str
    model_id: str
    variant: str
    path: Path


def contenders(release: Any, config: BenchConfig) -> list[Contender]:
    """Edge fp32, edge int8 (when quantised) and the cloud server file, in that order."""
    manifest = release.manifest
    edge = manifest.model(config.edge) if config.edge else manifest.newest("edge")
    cloud = manifest.model(config.cloud) if config.cloud else manifest.cloud_of(edge.id)
    chosen = [("edge fp32", edge.id, "device-fp32"), ("edge int8", edge.id, "device-int8"),
              ("cloud fp32", cloud.id, "server")]
    found = [Contender(name, model_id, variant, release.path(model_id, variant))
             for name, model_id, variant in chosen
             if variant == "server" or variant in manifest.model(model_id).variants]
    if not any(c.variant == "device-fp32" for c in found):
        raise KeyError(f"edge model {edge.id!r} has no device-fp32 file to benchmark")
    return found


def stats_ms(samples_ns: list[int]) -> dict[str, float]:
    """Median, p90, mean, min and max of timings, in milliseconds."""
    ms = np.asarray(samples_ns, dtype=np.float64) / 1e6
    return {"median": float(np.median(ms)), "p90": float(np.percentile(ms, 90)), "mean": float(ms.mean()),
            "min": float(ms.min()), "max": float(ms.max()), "runs": int(ms.size)}


def run_bench(release_folder: str | Path, photo: str | Path, config: BenchConfig | None = None,
              out_dir: str | Path | None = report.DEFAULT_REPORT_DIR) -> dict[str, Any]:
    """Time every contender, print nothing, write the report (unless out_dir is None) and return it."""
    from models.release import Release

    config = config or BenchConfig()
    release = Release.load(release_folder, verify=True)
    chosen = contenders(release, config)
    data = Path(photo).read_bytes()
    encoders, inputs, prep = {}, {}, {}
    for c in chosen:
        entry = release.manifest.model(c.model_id)
        encoders[c.name] = release.encoder(c.model_id, c.variant, threads=config.threads)
        inputs[c.name] = preprocess(load_image(data), entry.preprocess)[None]
        prep[c.name] = _time_preprocess(data, entry.preprocess, max(5, config.rounds // 10))
    latency = _interleave(encoders, inputs, config)
    rows = []
    for c in chosen:
        entry = release.manifest.model(c.model_id)
        precision = "fp32" if c.variant == "server" else entry.variants[c.variant].precision
        rows.append({"name": c.name, "model_id": c.model_id, "variant": c.variant, "file": c.path.name,
                     "precision": precision, "size_bytes": c.path.stat().st_size,
                     "input_shape": list(inputs[c.name].shape), "latency_ms": stats_ms(latency[c.name]),
                     "preprocess_ms": stats_ms(prep[c.name])})
    result = {**report.header(), "release": report.shown_path(release.folder), "photo": str(photo),
              "config": asdict(config), "models": rows, "ratios": ratios(rows)}
    if out_dir is not None:
        result["written"] = [str(p) for p in report.write(out_dir, STEM, result, markdown(result))]
    return result


def _interleave(encoders: dict[str, Any], inputs: dict[str, np.ndarray], config: BenchConfig) -> dict[str, list[int]]:
    """Warm up each model, then time one run of each per round, rotating which goes first."""
    names = list(encoders)
    for name in names:
        for _ in range(config.warmup):
            encoders[name].encode_arrays(inputs[name])
    times: dict[str, list[int]] = {name: [] for name in names}
    for round_ in range(config.rounds):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            encoder, x = encoders[name], inputs[name]
            start = time.perf_counter_ns()
            encoder.encode_arrays(x)
            times[name].append(time.perf_counter_ns() - start)
    return times


def _time_preprocess(data: bytes, spec: Any, runs: int) -> list[int]:
    """Decode + resize + crop of the photo bytes, the part a device runs before the encoder."""
    times = []
    for _ in range(runs):
        start = time.perf_counter_ns()
        preprocess(load_image(data), spec)
        times.append(time.perf_counter_ns() - start)
    return times


def ratios(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Latency (median) and file-size ratios between the contenders that are present."""
    by = {row["name"]: row for row in rows}
    pairs = {"int8_edge_over_cloud": ("edge int8", "cloud fp32"),
             "fp32_edge_over_cloud": ("edge fp32", "cloud fp32"),
             "int8_edge_over_fp32_edge": ("edge int8", "edge fp32")}
    found = {}
    for key, (a, b) in pairs.items():
        if a in by and b in by:
            found[f"latency_{key}"] = by[a]["latency_ms"]["median"] / by[b]["latency_ms"]["median"]
            found[f"size_{key}"] = by[a]["size_bytes"] / by[b]["size_bytes"]
    return found


def markdown(result: dict[str, Any]) -> str:
    """The report as markdown: a table of the contenders, the ratios and the context."""
    c = result["config"]
    rows = [[r["name"], r["model_id"], r["variant"], "x".join(map(str, r["input_shape"])),
             f"{r['size_bytes'] / 1e6:.2f}", f"{r['latency_ms']['median']:.3f}", f"{r['latency_ms']['p90']:.3f}",
             f"{r['preprocess_ms']['median']:.3f}"] for r in result["models"]]
    text = (f"# Device benchmark: batch-1 encoding on {c['threads']} thread(s)\n\n"
            f"{c['rounds']} interleaved rounds after {c['warmup']} warm-up runs per model; photo "
            f"`{result['photo']}`.\n\n")
    text += report.table(["model", "id", "variant", "input", "file MB", "median ms", "p90 ms",
                          "preprocess ms (median)"], rows)
    text += "\n" + "\n".join(f"- {k}: {v:.3f}" for k, v in result["ratios"].items()) + "\n\n"
    return text + report.context_markdown(result)


def print_table(result: dict[str, Any]) -> str:
    """A plain-text table for the terminal."""
    lines = [f"{'model':<11} {'variant':<12} {'input':<13} {'MB':>7} {'median ms':>10} {'p90 ms':>9}"]
    for r in result["models"]:
        shape = "x".join(map(str, r["input_shape"]))
        lines.append(f"{r['name']:<11} {r['variant']:<12} {shape:<13} {r['size_bytes'] / 1e6:>7.2f} "
                     f"{r['latency_ms']['median']:>10.3f} {r['latency_ms']['p90']:>9.3f}")
    lines += [f"{k}: {v:.3f}" for k, v in result["ratios"].items()]
    return "\n".join(lines)
