"""`concord quantize | ship | encode | query | index | device-bench | neardup`: the device side's commands.

Heavy imports (onnxruntime, onnx) happen inside the commands; nothing here imports torch.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from models.cli import DEFAULT_SERVER, SERVER_HELP, fail

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False)

ReleaseOpt = Annotated[Path | None, typer.Option("--release", help="Release folder (default: $CONCORD_RELEASE, "
                                                 "else the shipped models/release).")]
ModelOpt = Annotated[str | None, typer.Option("--model", help="Edge model id (default: the newest edge model).")]


def _user_errors() -> tuple[type[BaseException], ...]:
    from edge.client import ApiError
    from edge.halve import HalveError
    from edge.photos import PhotoSourceError
    from edge.quantize import QuantizeError
    from models.manifest import ManifestError
    from models.preprocess import ImageError
    from models.release import ReleaseError

    return (ApiError, PhotoSourceError, QuantizeError, HalveError, ManifestError, ImageError, ReleaseError,
            KeyError, FileNotFoundError, ValueError)


def _explain(err: BaseException) -> NoReturn:
    fail(err.args[0] if isinstance(err, KeyError) and err.args else str(err))


@app.command()
def quantize(
    model_id: Annotated[str, typer.Argument(help="The edge model to quantise (it needs a device-fp32 file).")],
    calibration: Annotated[Path, typer.Option(help="A folder of photos, or a list file of photo paths "
                                              "(e.g. Caltech-101 train.txt).")],
    release: ReleaseOpt = None,
    count: Annotated[int | None, typer.Option(help="Use this many photos, spread evenly over the list.")] = 256,
    root: Annotated[Path | None, typer.Option(help="Folder that relative lines of a list file start from.")] = None,
    method: Annotated[str, typer.Option(help="Calibration: minmax, entropy or percentile.")] = "minmax",
    activations: Annotated[str, typer.Option(help="Activation type: uint8 or int8.")] = "uint8",
    weights: Annotated[str, typer.Option(help="Weight type: int8 or uint8.")] = "int8",
    reduce_range: Annotated[bool, typer.Option(help="7-bit weights: no int16 saturation on x86 CPUs "
                                               "without VNNI (--no-reduce-range for ARM/VNNI devices).")] = True,
    per_channel: Annotated[bool, typer.Option(help="Per-channel weight scales.")] = True,
    pre_process: Annotated[bool, typer.Option(help="Run onnxruntime's quant_pre_process first.")] = True,
    float_blocks: Annotated[int, typer.Option(help="Keep the trunk's stem and its first N blocks in float (the "
                                              "layers int8 hurts most; 0: all int8).")] = 0,
) -> None:
    """Quantise an edge model to int8 (static QDQ, calibrated on real photos) and register `device-int8`."""
    from edge.photos import list_photos
    from edge.quantize import QuantizeConfig, quantize_model
    from models.release import resolve_release

    try:
        photos = list_photos(calibration, count, root)
        config = QuantizeConfig(calibrate_method=method, activations=activations, weights=weights,
                                reduce_range=reduce_range, per_channel=per_channel, pre_process=pre_process,
                                float_blocks=float_blocks)
        result = quantize_model(resolve_release(release), model_id, photos, config)
    except _user_errors() as err:
        _explain(err)
    print(f"wrote {result.file} ({result.size_bytes / 1e6:.2f} MB, fp32 {result.fp32_size_bytes / 1e6:.2f} MB) "
          f"calibrated on {result.calibration_photos} photos in {result.seconds:.1f} s")
    print(f"cosine to fp32 on {QuantizeConfig().check_photos} photos: mean {result.cosine_mean:.5f}, "
          f"min {result.cosine_min:.5f}; registered as device-int8 (sha256 {result.sha256[:12]}...)")
    if result.skipped_photos:
        print(f"skipped {len(result.skipped_photos)} unreadable photos, e.g. {result.skipped_photos[0]}")


@app.command()
def halve(
    model_id: Annotated[str, typer.Argument(help="The model whose server file to store with fp16 weights.")],
    check: Annotated[Path, typer.Option(help="A folder of photos, or a list file (e.g. Caltech-101 test.txt), to "
                                        "compare the half-size file with the fp32 one on.")],
    release: ReleaseOpt = None,
    count: Annotated[int | None, typer.Option(help="Use this many photos, spread evenly over the list.")] = 16,
    root: Annotated[Path | None, typer.Option(help="Folder that relative lines of a list file start from.")] = None,
) -> None:
    """Store a model's weights as fp16 (computed in fp32: half the file) and register `server-fp16`."""
    from edge.halve import MIN_COSINE, halve_model
    from edge.photos import list_photos
    from models.release import resolve_release

    try:
        result = halve_model(resolve_release(release), model_id, list_photos(check, count, root))
    except _user_errors() as err:
        _explain(err)
    print(f"wrote {result.file} ({result.size_bytes / 1e6:.2f} MB, fp32 {result.fp32_size_bytes / 1e6:.2f} MB); "
          f"cosine to fp32 min {result.cosine_min:.6f} (limit {MIN_COSINE}); registered as server-fp16")


@app.command()
def ship(
    release: Annotated[Path, typer.Option("--release", help="The full release (export + quantize) to ship from.")],
    out: Annotated[Path, typer.Option("--out", help="Where the slim release goes (e.g. models/release).")],
    keep: Annotated[list[str] | None, typer.Option(help="MODEL=VARIANT to ship instead of the default: an edge "
                                                        "model's device-int8 file and a cloud model's server-fp16 "
                                                        "one (`concord halve`) where they exist, else the server "
                                                        "file.")] = None,
    carry: Annotated[Path | None, typer.Option(help="An already shipped release: the models it holds ship with its "
                                                     "files, as they are (the files that made users' vectors), "
                                                     "with the new release's figures.")] = None,
    renew: Annotated[list[str] | None, typer.Option(help="An edge model to ship from --release although --carry "
                                                         "holds it (e.g. re-quantised): devices only query with "
                                                         "it, so no stored vector changes. Repeatable.")] = None,
) -> None:
    """Write a slim release: cloud models' server files (fp16-stored where halved) and edge models' int8 device
    files (what ships)."""
    from models.release import Release, ReleaseError

    try:
        full = Release.load(release)
        preferred = {"edge": "device-int8", "cloud": "server-fp16"}
        chosen = {e.id: preferred[e.role] if preferred.get(e.role) in e.variants else "server"
                  for e in full.manifest.models.values()}
        asked = dict(item.split("=", 1) for item in keep or [] if "=" in item)
        if len(asked) != len(keep or []):
            fail(f"--keep takes MODEL=VARIANT, got {keep}")
        chosen.update(asked)
        if out.exists() and any(out.iterdir()):
            fail(f"{out} is not empty: ship into an empty (or new) folder so no old file stays behind")
        shipped = Release.ship(full, out, chosen, Release.load(carry) if carry else None, renew or ())
    except (ReleaseError, KeyError, ValueError) as err:
        _explain(err)
    size = sum(f.stat().st_size for f in shipped.folder.iterdir())
    print(f"shipped {sorted(shipped.manifest.models)} to {out} ({size / 1e6:.1f} MB)")


@app.command()
def encode(
    photos: Annotated[list[Path], typer.Argument(help="Photos to encode.")],
    release: ReleaseOpt = None,
    model: ModelOpt = None,
    variant: Annotated[str | None, typer.Option(help="File to run (default: device-int8, else device-fp32).")] = None,
    out: Annotated[Path | None, typer.Option(help="Save to a .npy ([N, dim] float32) or .json file.")] = None,
) -> None:
    """Encode photos on this device and print (one JSON line each) or save their embeddings."""
    from edge.client import encode_photos
    from models.release import resolve_release

    if out is not None and out.suffix not in (".npy", ".json"):
        fail(f"--out must end in .npy or .json, got {out.name!r}")
    try:
        encoded = encode_photos(resolve_release(release), photos, model, variant)
    except _user_errors() as err:
        _explain(err)
    if out is None:
        for photo, vector in zip(encoded.photos, encoded.vectors, strict=True):
            print(json.dumps({"photo": photo, "model_id": encoded.model_id, "variant": encoded.variant,
                              "embedding": [round(float(x), 7) for x in vector]}))
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".npy":
        import numpy as np

        np.save(out, encoded.vectors)
    else:
        out.write_text(json.dumps({"model_id": encoded.model_id, "variant": encoded.variant,
                                   "dim": int(encoded.vectors.shape[1]), "photos": encoded.photos,
                                   "embeddings": encoded.vectors.tolist()}) + "\n")
    print(f"wrote {len(encoded.photos)} embeddings of {encoded.model_id} ({encoded.variant}) to {out}")


@app.command()
def query(
    photo: Annotated[Path, typer.Argument(help="The query photo (it stays on this device).")],
    server: Annotated[str, typer.Option(envvar="CONCORD_SERVER", help=SERVER_HELP)] = DEFAULT_SERVER,
    k: Annotated[int, typer.Option(help="Number of hits.")] = 10,
    api_key: Annotated[str | None, typer.Option(envvar="CONCORD_API_KEY", help="API key (X-API-Key).")] = None,
    release: ReleaseOpt = None,
    model: ModelOpt = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the server.")] = 10.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the hits as JSON.")] = False,
    match: Annotated[str, typer.Option(help="similar: photos like this one; duplicate: this same photo, cropped, "
                                       "resized or re-saved (needs a release whose space has a photo "
                                       "fingerprint).")] = "similar",
) -> None:
    """Encode a photo on this device, send only its embedding to the server, print the hits."""
    from edge.client import ConcordClient, encode_photos, format_hits
    from models.release import resolve_release

    try:
        encoded = encode_photos(resolve_release(release), [photo], model)
        with ConcordClient(server, api_key, timeout) as client:
            found = client.search_embedding(encoded.vectors[0], encoded.model_id, k, match)
    except _user_errors() as err:
        _explain(err)
    if as_json:
        print(json.dumps({"model_id": encoded.model_id, "variant": encoded.variant, "match": match,
                          "hits": [vars(h) for h in found.hits], "searched_models": found.searched_models,
                          "skipped_models": found.skipped_models}, indent=2))
    else:
        print(f"encoded {photo} on this device with {encoded.model_id} ({encoded.variant}); match: {match}")
        print(format_hits(found))


@app.command()
def index(
    folder: Annotated[Path, typer.Argument(help="Folder of photos (jpg, jpeg, png, webp, bmp, gif, tif), walked "
                                           "recursively.")],
    server: Annotated[str, typer.Option(envvar="CONCORD_SERVER", help=SERVER_HELP)] = DEFAULT_SERVER,
    api_key: Annotated[str | None, typer.Option(help="API key (env CONCORD_API_KEY)", envvar="CONCORD_API_KEY")]
    = None,
    batch: Annotated[int, typer.Option(help="Photos per upload request.")] = 16,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
) -> None:
    """Send a folder of photos to a server in batches; what the server has already (same sha256) is skipped, so
    an interrupted run resumes where it stopped."""
    from edge.client import ApiError
    from edge.indexer import Indexer, IndexingError

    try:
        indexer = Indexer(server, api_key, batch)
        try:
            report = indexer.run(folder, progress=progress)
        finally:
            indexer.close()
    except (IndexingError, ApiError) as err:
        fail(str(err))
    for path, why in report.failed:
        print(f"concord: failed: {path}: {why}", file=sys.stderr)
    print(report.summary())
    if report.failed:
        raise typer.Exit(2)


@app.command("device-bench")
def device_bench(
    release: ReleaseOpt = None,
    photo: Annotated[Path | None, typer.Option(help="A real photo to time (default: the first benchmark "
                                               "query photo).")] = None,
    rounds: Annotated[int, typer.Option(help="Timed runs per model (interleaved).")] = 300,
    warmup: Annotated[int, typer.Option(help="Untimed runs per model first.")] = 30,
    threads: Annotated[int, typer.Option(help="Threads per onnxruntime session.")] = 1,
    edge: Annotated[str | None, typer.Option(help="Edge model id (default: the newest).")] = None,
    cloud: Annotated[str | None, typer.Option(help="Cloud model id (default: the edge model's cloud).")] = None,
    accuracy: Annotated[bool, typer.Option(help="Also measure int8 vs fp32 Recall@1 on the benchmark.")] = False,
    timing: Annotated[bool, typer.Option(help="Time the encoders (--no-timing: accuracy only).")] = True,
    data: Annotated[Path | None, typer.Option(help="Caltech-101 folder (default: $CONCORD_DATA, else "
                                              "../shared/datasets/caltech101).")] = None,
    limit: Annotated[int | None, typer.Option(help="Accuracy on about this many photos of each set.")] = None,
    cache: Annotated[Path, typer.Option(help="Cache of benchmark embeddings.")] = Path("cache/edge"),
    out_dir: Annotated[Path, typer.Option(help="Report folder.")] = Path("reports/edge"),
    previous: Annotated[Path | None, typer.Option(help="With --accuracy: a release holding the edge model's int8 "
                                                  "file that devices run now (e.g. models/release); also measure "
                                                  "what renewing that file changes for them.")] = None,
) -> None:
    """Time batch-1 encoding of edge fp32, edge int8 and the cloud encoder; optionally their accuracy."""
    from edge.bench.accuracy import run_accuracy
    from edge.bench.device import BenchConfig, print_table, run_bench
    from models.benchmark.caltech import load_split
    from models.benchmark.report import fmt
    from models.release import resolve_release

    folder = resolve_release(release)
    try:
        if timing:
            if photo is None:
                split = load_split(data)
                photo = split.image_dir / split.queries[0]
            result = run_bench(folder, photo, BenchConfig(rounds, warmup, threads, edge, cloud), out_dir)
            print(print_table(result))
            print("wrote " + ", ".join(result["written"]))
        if accuracy:
            found = run_accuracy(folder, edge, cloud, data, cache, out_dir, limit, previous)
            for variant, groups in found["figures"].items():
                figures = [f"{g} R@1 {fmt(f['recall@1'], 4)} mAP {fmt(f['map'], 4)}"
                           for g, f in groups.items() if f["queries"]]
                print(f"{found['edge']} {variant} -> {found['cloud']} gallery: " + ", ".join(figures))
            for key, shown in (("int8_vs_fp32", "int8 vs fp32"), ("int8_vs_previous", "int8 vs the previous int8")):
                if key in found:
                    print(f"{shown}: " + ", ".join(f"{k} {v:.4f}" for k, v in found[key].items()))
            print("wrote " + ", ".join(found["written"]))
    except _user_errors() as err:
        _explain(err)


@app.command()
def neardup(
    release: Annotated[Path | None, typer.Option(help="Release folder (env CONCORD_RELEASE; default: the shipped "
                                                 "release)")] = None,
    data: Annotated[Path | None, typer.Option(help="Caltech-101 folder (env CONCORD_DATA; default "
                                              "../shared/datasets/caltech101)")] = None,
    out: Annotated[Path, typer.Option(help="Report folder")] = Path("reports/neardup"),
    cache: Annotated[Path, typer.Option(help="Gallery embeddings cache")] = Path("cache/neardup"),
    queries: Annotated[int, typer.Option(help="Near-duplicate queries (a fixed-seed sample of the gallery)")] = 500,
    seed: Annotated[int, typer.Option(help="Seed of the sample and the transformations")] = 0,
    gallery_model: Annotated[str | None, typer.Option(help="Cloud model of the gallery (default: the oldest)")]
    = None,
    threads: Annotated[int | None, typer.Option(help="onnxruntime threads")] = None,
) -> None:
    """Near-duplicate search: does each query model find the original photo in the cloud gallery, in duplicate
    and similar match (and by the photo fingerprint alone)?"""
    from edge.bench.neardup import main

    raise typer.Exit(main(release, data, out, cache, queries, seed, gallery_model, threads))
