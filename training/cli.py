"""`concord` commands of the training part: cache, train, evaluate, benchmark, export.

torch and the training modules are imported inside each command, so `concord --help` stays light.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

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
    from training.benchmark import Paths, recipe_config, train_model
    from training.data import load_benchmark
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


@app.command()
def benchmark(data: DataOpt = None, cache_dir: CacheOpt = Path("cache"), runs: RunsOpt = Path("runs"),
              out: ReportOpt = Path("reports/benchmark")) -> None:
    """The whole benchmark: cache features, train every model in order, evaluate. Resumable."""
    from training.benchmark import RECIPE, Paths, evaluate_recipe

    report = evaluate_recipe(RECIPE, data, Paths(cache_dir, runs, out), train_missing=True)
    typer.echo(report)
