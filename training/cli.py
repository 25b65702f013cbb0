"""`concord` commands of the training part: cache, train, evaluate, benchmark, export.

torch and the training modules are imported inside each command, so `concord --help` stays light.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from models.cli import fail

app = typer.Typer(help="Train, evaluate and export Concord models.", no_args_is_help=True)

DataOpt = Annotated[Path | None, typer.Option("--data", help="Caltech-101 folder (default: $CONCORD_DATA or "
                                                             "../shared/datasets/caltech101).")]
CacheOpt = Annotated[Path, typer.Option("--cache-dir", help="Where trunk features are cached.")]
RunsOpt = Annotated[Path, typer.Option("--runs", help="Where checkpoints are written.")]
ReportOpt = Annotated[Path, typer.Option("--out", help="Report folder.")]


@app.command()
def cache(data: DataOpt = None, cache_dir: CacheOpt = Path("cache")) -> None:
    """Cache frozen trunk features of every benchmark photo for every architecture of the recipe."""
    from training.benchmark import RECIPE, Paths, cache_recipe

    cache_recipe(RECIPE, data, Paths(cache=cache_dir))


@app.command()
def train(model: Annotated[str, typer.Argument(help="A recipe model id (e.g. cloud-v2) or a config .toml.")],
          data: DataOpt = None, cache_dir: CacheOpt = Path("cache"), runs: RunsOpt = Path("runs")) -> None:
    """Train one model from its experiment config; resumes an interrupted run."""
    from models.benchmark.caltech import load_benchmark
    from training.benchmark import Paths, recipe_config, train_model
    from training.trainer import TrainConfig

    config = TrainConfig.from_toml(model) if model.endswith(".toml") else recipe_config(model)
    checkpoint = train_model(config.model_id, load_benchmark(data), Paths(cache_dir, runs), config)
    typer.echo(f"{config.model_id}: {checkpoint}")


@app.command()
def evaluate(data: DataOpt = None, cache_dir: CacheOpt = Path("cache"), runs: RunsOpt = Path("runs"),
             out: ReportOpt = Path("reports/benchmark")) -> None:
    """Evaluate the trained recipe: compatibility matrix, ECC, gaps, AC, tax, NFR/PFR, mixed gallery."""
    from training.benchmark import RECIPE, Paths, evaluate_recipe

    report = evaluate_recipe(RECIPE, data, Paths(cache_dir, runs, out))
    typer.echo(report)


@app.command("evaluate-release")
def evaluate_release(
    release: Annotated[Path | None, typer.Option(help="Release folder (default: the release shipped in the "
                                                 "package).")] = None,
    open_data: Annotated[Path | None, typer.Option(help="Open-world folder (default: $CONCORD_OPEN_DATA or "
                                                   "../shared/datasets/tinyimagenet_open).")] = None,
    cache_dir: CacheOpt = Path("cache"),
    out: ReportOpt = Path("reports/release"),
    previous: Annotated[Path | None, typer.Option(help="The release devices run now (e.g. a checkout of the shipped "
                                                  "one): also report what each renewed edge device file changes "
                                                  "for its users.")] = None,
) -> None:
    """The release's compatibility on photos of categories it never trained on: its ONNX files as they ship
    encode the open-world eval photos; writes OUT/tinyimagenet_open.{json,md} and heatmaps."""
    from models.release import resolve_release
    from training.benchmark import open_world_protocol
    from training.evaluate.release import evaluate_release as run

    try:
        written = run(resolve_release(release), open_world_protocol(), out, cache_dir / "release-eval", open_data,
                      previous)
    except (FileNotFoundError, ValueError) as err:
        fail(str(err))
    typer.echo(written["markdown"].read_text())


@app.command()
def benchmark(data: DataOpt = None, cache_dir: CacheOpt = Path("cache"), runs: RunsOpt = Path("runs"),
              out: ReportOpt = Path("reports/benchmark")) -> None:
    """The whole benchmark: cache features, train every model in order, evaluate. Resumable."""
    from training.benchmark import RECIPE, Paths, evaluate_recipe

    report = evaluate_recipe(RECIPE, data, Paths(cache_dir, runs, out), train_missing=True)
    typer.echo(report)


@app.command()
def restore(release: Annotated[Path, typer.Option(help="The release whose models the chain continues from.")]
            = Path("models/release"), runs: RunsOpt = Path("runs"),
            model: Annotated[list[str] | None, typer.Option(help="Only these models (default: all).")] = None) -> None:
    """Put the released models' head weights into their trained checkpoints, so a later model trains against
    exactly the models that made users' vectors (training on CPUs is not bit-for-bit repeatable)."""
    from training.restore import restore_heads

    try:
        moved = restore_heads(release, runs, model)
    except (FileNotFoundError, ValueError) as err:
        fail(str(err))
    for model_id, change in moved.items():
        typer.echo(f"{model_id}: head restored from {release} (largest weight change {change:.4f})")


@app.command()
def export(
    checkpoints: Annotated[list[str], typer.Argument(help="Checkpoint files, or model ids (RUNS/<id>/checkpoint.pt).")],
    out: Annotated[Path, typer.Option("--out", help="The release folder to write.")] = Path("release"),
    report: Annotated[list[Path] | None, typer.Option(help="The JSON reports of `concord evaluate` (Caltech-101 first, "
                                                           "then the open-world one): the figures the manifest "
                                                           "records and the gate judges on every one.")] = None,
    photos: Annotated[Path | None, typer.Option(help="A folder of real photos to check onnxruntime against torch "
                                                     "(default: benchmark query photos).")] = None,
    count: Annotated[int, typer.Option(help="How many photos the check uses.")] = 16,
    data: DataOpt = None,
    runs: RunsOpt = Path("runs"),
    name: Annotated[str, typer.Option("--name", help="The release's name in its manifest.")] = "",
    gate: Annotated[bool, typer.Option(help="Refuse models that fail the compatibility gate.")] = True,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing release folder.")] = False,
) -> None:
    """Export checkpoints to a release folder: server and device ONNX files, verified, with manifest.json."""
    from training.export import ExportError, export_release

    paths = [Path(c) if c.endswith(".pt") or Path(c).is_file() else runs / c / "checkpoint.pt" for c in checkpoints]
    try:
        chosen = _export_photos(photos, data, count)
        manifest = export_release(paths, out, chosen, _reports(report), release=name,
                                  require_gate=gate, overwrite=overwrite)
    except (ExportError, FileNotFoundError, ValueError) as err:
        typer.echo(f"concord export: {err}", err=True)
        raise typer.Exit(1) from None
    for entry in manifest.models.values():
        verdict = entry.card["gate"]
        cosines = ", ".join(f"{k} {v:.6f}" for k, v in entry.card["export"]["worst_cosine"].items())
        typer.echo(f"{entry.id}: {entry.file} (+{', '.join(entry.variants)}); worst cosine {cosines}; "
                   f"gate {'passed' if verdict['passed'] else 'FAILED'}: {verdict['reason']}")
    typer.echo(f"release written to {out}")


def _reports(paths: list[Path] | None) -> dict[str, Any] | None:
    """The evaluation reports as export takes them: the first one, the others under "benchmarks"."""
    from training.export import load_report

    if not paths:
        return None
    first, *more = [load_report(p) for p in paths]
    return {**first, "benchmarks": more} if more else first


def _export_photos(folder: Path | None, data: Path | None, count: int) -> list[Path]:
    """`count` photos spread evenly over a folder, or over the benchmark's queries."""
    if folder is not None:
        found = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp"))
        if not found:
            raise FileNotFoundError(f"{folder}: no photos (.jpg, .jpeg, .png, .webp) here")
    else:
        from models.benchmark.caltech import load_benchmark

        bench = load_benchmark(data)
        found = [bench.image_dir / p for p in bench.queries.paths]
    step = max(1, len(found) // max(count, 1))
    return found[::step][:count]


@app.command()
def fingerprint(data: DataOpt = None, space: Annotated[str, typer.Option(help="The space id.")] = "concord2",
                out: Annotated[Path | None, typer.Option(help="Where to write (default: the training package's "
                                                              "spaces/<space>.npz).")] = None,
                seed: int = 0) -> None:
    """Fit the space's photo fingerprint on the gallery photos and their near-duplicates (deterministic)."""
    from models.benchmark.caltech import load_benchmark
    from training.fingerprint import fit_space, space_file

    bench = load_benchmark(data)
    path = fit_space(bench.image_dir, list(bench.gallery.paths), out or space_file(space), seed=seed)
    typer.echo(f"fingerprint of space {space!r}: {path}")
