"""Encoding benchmark: cloud photos/s at batch 16 (decoding included), edge batch-1 latency, API ingest.

The cloud figure is the ingest bound: a server can index no faster than its encoder turns photo bytes into
vectors. Each batch of real photos runs through every cloud model in turn (rotating order), once from the
bytes (decode + resize + crop + encode) and once from ready tensors (the encoder alone). Edge batch-1
latency comes from the device benchmark (`edge.bench.device`) on the same release.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from models.benchmark.caltech import data_root
from models.benchmark.report import interleave, latency_ms, shown_path


def default_photos() -> Path:
    """Caltech-101's photo folder: $CONCORD_DATA/101_ObjectCategories, else under ../shared/datasets."""
    return data_root() / "101_ObjectCategories"


def load_photos(source: str | Path, count: int) -> list[tuple[str, bytes]]:
    """`count` photos spread evenly over a folder (recursively) or a list file, as (name, bytes)."""
    from edge.photos import list_photos

    return [(str(path), path.read_bytes()) for path in list_photos(source, count)]


@dataclass(frozen=True)
class EncodeConfig:
    """How many photos, the batch size, and the edge timing rounds."""

    photos: int = 320
    batch: int = 16
    threads: int | None = None
    """onnxruntime threads of the cloud encoders (None: one per core, as the server runs them)."""
    edge_rounds: int = 200
    edge_warmup: int = 20


def batches(items: list[Any], size: int) -> list[list[Any]]:
    """Consecutive full batches of `size` (a short tail is dropped so every timing covers `size` items)."""
    return [items[i:i + size] for i in range(0, len(items) - size + 1, size)]


def _by_index(call: Callable[[Any], Any], items: Sequence[Any], i: int) -> Any:
    return call(items[i])


def cloud_throughput(release: Any, photos: list[bytes], config: EncodeConfig) -> list[dict[str, Any]]:
    """Photos/s of every cloud model at batch `config.batch`: from bytes (with decoding) and from tensors."""
    from models.preprocess import load_image, preprocess

    clouds = release.manifest.of_role("cloud")
    groups = batches(photos, config.batch)
    if not groups:
        raise ValueError(f"need at least {config.batch} photos for batches of {config.batch}, got {len(photos)}")
    calls: dict[str, Callable[[int], Any]] = {}
    for entry in clouds:
        encoder = release.encoder(entry.id, "server", threads=config.threads)
        encoder.encode_bytes(groups[0])  # warm-up
        tensors = [np.stack([preprocess(load_image(b), entry.preprocess) for b in group]) for group in groups]
        calls[f"{entry.id} bytes"] = partial(_by_index, encoder.encode_bytes, groups)
        calls[f"{entry.id} tensors"] = partial(_by_index, encoder.encode_arrays, tensors)
    times = interleave(calls, len(groups))
    rows = []
    for entry in clouds:
        by_bytes, by_tensors = times[f"{entry.id} bytes"], times[f"{entry.id} tensors"]
        rows.append({"model_id": entry.id, "arch": entry.arch, "crop": entry.preprocess.crop,
                     "batch": config.batch, "batches": len(groups),
                     "photos_per_s_with_decoding": config.batch * len(by_bytes) * 1e9 / sum(by_bytes),
                     "photos_per_s_encoder_only": config.batch * len(by_tensors) * 1e9 / sum(by_tensors),
                     "batch_ms_with_decoding": latency_ms(by_bytes), "batch_ms_encoder_only": latency_ms(by_tensors)})
    return rows


def edge_latency(release_folder: Path, photo: Path, config: EncodeConfig) -> dict[str, Any]:
    """Batch-1, one-thread latency of the newest edge model (device fp32 and int8 files) and its cloud model.

    The device benchmark (`edge.bench.device`) measures it when the release has the edge model's fp32 device file;
    a release without it (the shipped one keeps only int8) gets `device_files_latency` on the files present.
    """
    from edge.bench.device import BenchConfig, run_bench

    head = {"photo": str(photo), "rounds": config.edge_rounds, "threads": 1}
    try:
        found = run_bench(release_folder, photo, BenchConfig(config.edge_rounds, config.edge_warmup, threads=1),
                          out_dir=None)
    except KeyError as err:
        rows = device_files_latency(release_folder, photo, config)
        note = f"edge.bench.device needs a device fp32 file ({str(err).strip(chr(39))}); timed the files present"
        if not any(r["variant"].startswith("device") for r in rows):
            return {**head, "models": [], "ratios": {}, "skipped": f"no device file to time: {note}"}
        return {**head, "models": rows, "ratios": {}, "note": note}
    return {**head, "models": [{"name": r["name"], "model_id": r["model_id"], "variant": r["variant"],
                                "precision": r["precision"], "size_bytes": r["size_bytes"],
                                "latency_ms": r["latency_ms"], "preprocess_ms": r["preprocess_ms"]}
                               for r in found["models"]],
            "ratios": found["ratios"]}


def _decode(data: bytes, spec: Any, _round: int) -> np.ndarray:
    """Decode + resize + crop of photo bytes: what a device runs before its encoder."""
    from models.preprocess import load_image, preprocess

    return preprocess(load_image(data), spec)


def device_files_latency(release_folder: Path, photo: Path, config: EncodeConfig) -> list[dict[str, Any]]:
    """Batch-1, one-thread latency of every device file of the newest edge model and of its cloud model's
    server file, on one photo, interleaved round by round."""
    from models.preprocess import load_image, preprocess
    from models.release import Release

    release = Release.load(release_folder)
    edge = release.manifest.newest("edge")
    cloud = release.manifest.cloud_of(edge.id)
    chosen = [(f"edge {f.precision}", edge, name) for name, f in sorted(edge.variants.items())
              if name.startswith("device")] + [("cloud fp32", cloud, "server")]
    data = photo.read_bytes()
    calls: dict[str, Callable[[int], Any]] = {}
    prep: dict[str, list[int]] = {}
    for name, entry, variant in chosen:
        encoder = release.encoder(entry.id, variant, threads=1)
        x = preprocess(load_image(data), entry.preprocess)[None]
        for _ in range(config.edge_warmup):
            encoder.encode_arrays(x)
        calls[name] = partial(_by_index, encoder.encode_arrays, [x] * config.edge_rounds)
        prep[name] = interleave({"p": partial(_decode, data, entry.preprocess)}, max(5, config.edge_rounds // 10))["p"]
    times = interleave(calls, config.edge_rounds)
    return [{"name": name, "model_id": entry.id, "variant": variant,
             "precision": "fp32" if variant == "server" else entry.variants[variant].precision,
             "size_bytes": release.path(entry.id, variant).stat().st_size,
             "latency_ms": {**latency_ms(times[name]), "median": latency_ms(times[name])["p50"]},
             "preprocess_ms": {**latency_ms(prep[name]), "median": latency_ms(prep[name])["p50"]}}
            for name, entry, variant in chosen]


def run_encode(release_folder: Path, photos: list[tuple[str, bytes]], config: EncodeConfig) -> dict[str, Any]:
    """Cloud throughput and edge latency on one release and one photo sample."""
    from models.release import Release

    release = Release.load(release_folder, verify=True)
    start = time.perf_counter()
    data = [b for _, b in photos]
    result: dict[str, Any] = {"release": shown_path(release_folder), "photos": len(photos), "config": asdict(config)}
    result["cloud"] = cloud_throughput(release, data, config)
    result["edge"] = edge_latency(release_folder, Path(photos[0][0]), config)
    result["seconds"] = time.perf_counter() - start
    return result


def api_ingest(release_folder: Path, photos: list[tuple[str, bytes]], config: EncodeConfig, data_dir: Path,
               log: Path) -> dict[str, Any]:
    """Photos/s of `POST /v1/photos` (batches, a fresh store) against the bare encoder on the same batches, interleaved.

    The bare side is what the server's encoding amounts to: decode, preprocess and encode the batch with the
    active cloud model's server file (onnxruntime on the same threads); the API adds HTTP, checks, hashing,
    the SQLite commit and the FAISS add.
    """
    import shutil

    from models.release import Release
    from server.bench.driver import Server

    if data_dir.exists():
        shutil.rmtree(data_dir)
    warm, *groups = batches(photos, config.batch)
    if not groups:
        raise ValueError(f"need at least {2 * config.batch} photos: one batch warms up, the others are timed")
    with Server(release_folder, data_dir, log, threads=config.threads) as server:
        model_id = server.client.models()["active_model"]
        encoder = Release.load(release_folder).encoder(model_id, "server", threads=config.threads)
        encoder.encode_bytes([b for _, b in warm])  # warm-up batch, both sides, not timed
        server.client.add_photos(warm)
        added = 0

        def api(i: int) -> None:
            nonlocal added
            added += int(server.client.add_photos(groups[i])["added"])

        datas = [[b for _, b in group] for group in groups]
        times = interleave({"api": api, "bare": partial(_by_index, encoder.encode_bytes, datas)}, len(groups))
        stats = server.client.stats()
    rates = {name: config.batch * len(values) * 1e9 / sum(values) for name, values in times.items()}
    return {"model_id": model_id, "batch": config.batch, "batches": len(groups), "photos_added": added,
            "photos_in_store": stats.get("vectors_total"), "photos_per_s_api": rates["api"],
            "photos_per_s_bare_encoder": rates["bare"], "ratio_api_over_bare": rates["api"] / rates["bare"],
            "batch_ms": {name: latency_ms(values) for name, values in times.items()},
            "server_start_s": server.start_s}
